"""Token sampling with counter-based randomness.

Each sample has a 64-bit seed (its request's, or one drawn from the engine's seed; see
``sample_seed`` for n > 1). The noise for its n-th generated token is a hash of (seed, n, token
id), so a request samples the same tokens whatever else is in its batch, across preemptions, on
any device: the hash is int64 arithmetic whose products stay below 2^63, exact on CPU and GPU.
Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel noise) draws from softmax(logits / T).
"""
import torch
from torch import nn

_MASK32 = 0xFFFFFFFF
_MASK64 = 2**64 - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # SplitMix64's increment


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """PCG-style integer hash of int64 values in [0, 2^32), a bijection of them; products stay below 2^63."""
    x = (x * 747796405 + 2891336453) & _MASK32
    x = ((x >> ((x >> 28) + 4)) ^ x) * 277803737 & _MASK32
    return (x >> 22) ^ x


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise ``[B, V]`` determined by (seed, step, token id) alone. Both 32-bit
    halves of the int64 seed go in, through bijections, so every bit of it counts."""
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    row = _hash32(_hash32(_hash32(low) ^ high) ^ (steps & _MASK32))
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(row[:, None] ^ _hash32(token)[None, :])
    return (bits.double() + 0.5) / 2.0**32


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample ``index`` of a request seeded ``seed``, as the signed int64 the
    sampler's tensors hold. Sample 0 uses the seed itself (n=1 and the first of n samples agree);
    sample i > 0 the i-th output of SplitMix64 seeded with it, so that the samples of one seed are
    unrelated to those of the next (vLLM's ``seed + i`` makes sample 1 of seed s sample 0 of s + 1)."""
    x = seed & _MASK64
    if index:
        x = (x + index * _GOLDEN64) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x - 2**64 if x >= 2**63 else x


class Sampler(nn.Module):
    def forward(self, logits, temperatures, top_ks, top_ps, seeds, steps):
        """logits [B, V] (fp32); per-row temperature, top_k (<= 0: off), top_p, seed, step.
        ``temperatures`` None: the whole batch is greedy (the caller knew it without a device sync)."""
        greedy = logits.argmax(-1)
        if temperatures is None or not bool((temperatures > 0).any()):
            return greedy
        logits = logits / temperatures.clamp(min=1e-5)[:, None]
        if bool((top_ks > 0).any()) or bool((top_ps < 1).any()):
            logits = _filter_top_k_top_p(logits, top_ks, top_ps)
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, logits.shape[-1])))
        sampled = (logits.double() + gumbel).argmax(-1)
        return torch.where(temperatures > 0, sampled, greedy)


def _filter_top_k_top_p(logits, top_ks, top_ps):
    sorted_logits, order = logits.sort(-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_ks > 0, top_ks, vocab)[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p. The top token always stays, also when
    # top_p is below float32's smallest value and reads as 0 here.
    drop |= ((probs.cumsum(-1) - probs) >= top_ps[:, None]) & (rank > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
