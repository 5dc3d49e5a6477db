"""Temperature sampling in one pass over the logits: the Gumbel-max trick with counter-based noise,
fused into an argmax (what ``minivllm.layers.sampler`` computes in about a dozen eager kernels over
[batch, vocab] float64 temporaries).

``gumbel_argmax(logits, temperatures, noise_keys)`` returns, per row b, ``argmax_v(logits[b, v] / T_b
+ g(b, v))`` with Gumbel noise ``g = -log(-log(u))`` and ``u = (hash(key_b ^ hash(v)) + 0.5) / 2^32``,
``key_b`` the row's 32-bit noise key (``minivllm.layers.sampler.noise_keys``): the same noise, the
same float64 sum and the same first-index tie rule as the torch reference, so the two pick the same
tokens. Rows with ``T_b = 0`` are greedy: the argmax of their logits, with no noise.
"""
import torch

from kernels.guard import check_tensors, pdl_entry, pdl_launch, tl, triton, use_triton

BLOCK_V = 2048
MIN_TEMPERATURE = 1e-5  # as the reference clamps it


@triton.jit
def _hash32(x):
    # The reference's PCG-style hash of int64 values in [0, 2^32): products stay below 2^63.
    x = (x * 747796405 + 2891336453) & 0xFFFFFFFF
    x = (((x >> ((x >> 28) + 4)) ^ x) * 277803737) & 0xFFFFFFFF
    return (x >> 22) ^ x


@triton.jit
def _gumbel_argmax_kernel(LOGITS, TEMPERATURES, KEYS, OUT, stride_b, V, MIN_T, BLOCK_V: tl.constexpr,
                          USE_PDL: tl.constexpr):
    pdl_entry(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(TEMPERATURES + b)
    key = tl.load(KEYS + b)
    greedy = t == 0.0
    t = tl.maximum(t, MIN_T)
    lanes = tl.arange(0, BLOCK_V)
    # Per lane, the best score and its token over the blocks seen (strictly greater: the earlier
    # block keeps a tie); then the first token among the lanes' best, as torch.argmax picks.
    best = tl.full([BLOCK_V], -float("inf"), tl.float64)
    best_token = tl.zeros([BLOCK_V], tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        logit = tl.load(LOGITS + b * stride_b + cols, mask=mask, other=0.0)
        bits = _hash32(key ^ _hash32(cols.to(tl.int64)))
        u = (bits.to(tl.float64) + 0.5) / 4294967296.0
        noisy = (logit / t).to(tl.float64) - tl.log(-tl.log(u))
        score = tl.where(greedy, logit.to(tl.float64), noisy)
        score = tl.where(mask, score, -float("inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_token = tl.where(better, cols.to(tl.int64), best_token)
    top = tl.max(best, axis=0)
    tl.store(OUT + b, tl.min(tl.where(best == top, best_token, V), axis=0))


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor) -> torch.Tensor:
    """Sampled token ids [B] (int64) from ``logits`` [B, V] (fp32, contiguous in V), per-row
    ``temperatures`` [B] (fp32; 0 is greedy) and ``noise_keys`` [B] (int64 in [0, 2^32))."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"gumbel_argmax: logits {tuple(logits.shape)} {logits.dtype} must be [B, V] float32")
    check_tensors("gumbel_argmax", logits=logits)
    rows = logits.shape[0]
    if temperatures.shape != (rows,) or temperatures.dtype != torch.float32:
        raise ValueError(f"gumbel_argmax: temperatures {tuple(temperatures.shape)} {temperatures.dtype} must be "
                         f"[{rows}] float32")
    if noise_keys.shape != (rows,) or noise_keys.dtype != torch.int64:
        raise ValueError(f"gumbel_argmax: noise_keys {tuple(noise_keys.shape)} {noise_keys.dtype} must be "
                         f"[{rows}] int64")
    if temperatures.device != logits.device or noise_keys.device != logits.device:
        raise ValueError("gumbel_argmax: temperatures and noise_keys must be on the logits' device")
    if not use_triton(logits):
        return gumbel_argmax_ref(logits, temperatures, noise_keys)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _gumbel_argmax_kernel[(rows,)](logits, temperatures, noise_keys, out, logits.stride(0), logits.shape[1],
                                       MIN_TEMPERATURE, BLOCK_V=BLOCK_V, num_warps=8, **pdl_launch(logits))
    return out


MASK32 = 0xFFFFFFFF


def hash32_ref(x: torch.Tensor) -> torch.Tensor:
    """PCG-style integer hash of int64 values in [0, 2^32), a bijection of them; products stay below
    2^63, so int64 arithmetic gives the same bits on every device."""
    x = (x * 747796405 + 2891336453) & MASK32
    x = ((x >> ((x >> 28) + 4)) ^ x) * 277803737 & MASK32
    return (x >> 22) ^ x


def token_noise(noise_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, V] (float64) of each row's key and each token id."""
    token = torch.arange(vocab_size, device=noise_keys.device, dtype=torch.int64)
    bits = hash32_ref(noise_keys[:, None] ^ hash32_ref(token)[None, :])
    return (bits.double() + 0.5) / 2.0**32


def gumbel_argmax_ref(logits, temperatures, noise_keys):
    """The same function in eager torch (float64 noise over the whole [B, V])."""
    gumbel = -torch.log(-torch.log(token_noise(noise_keys, logits.shape[-1])))
    sampled = ((logits / temperatures.clamp(min=MIN_TEMPERATURE)[:, None]).double() + gumbel).argmax(-1)
    return torch.where(temperatures > 0, sampled, logits.argmax(-1))
