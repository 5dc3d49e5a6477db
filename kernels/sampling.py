"""Temperature sampling in one pass over the logits: the Gumbel-max trick with counter-based noise,
fused into an argmax (what ``minivllm.layers.sampler`` computes in about a dozen eager kernels over
[batch, vocab] float64 temporaries).

``gumbel_argmax(logits, temperatures, noise_keys)`` returns, per row b, ``argmax_v(logits[b, v] / T_b
+ g(b, v))`` with Gumbel noise ``g = -log(-log(u))`` and ``u = (hash(key_b ^ hash(v)) + 0.5) / 2^32``,
``key_b`` the row's 32-bit noise key (``minivllm.layers.sampler.noise_keys``): the same noise, the
same float64 sum and the same first-index tie rule as the torch reference, so the two pick the same
tokens. Rows with ``T_b = 0`` are greedy: the argmax of their logits, with no noise.

``sample(logits, temperatures, top_ks, top_ps, noise_keys)`` adds per-row top-k and top-p without a
sort and without a host sync (a CUDA graph can capture it): the same draw over the tokens the filters
keep, defined below with its torch reference ``sample_ref``.
"""
import torch

from kernels.guard import HAVE_TRITON, INTERPRET, check_tensors, pdl_entry, pdl_launch, sm_count, tl, triton, use_triton

BLOCK_V = 2048
MIN_TEMPERATURE = 1e-5  # as the reference clamps it


@triton.jit
def _hash32(x):
    # The reference's PCG-style hash of values in [0, 2^32), in uint32 arithmetic: its products wrap
    # modulo 2^32, the reference's int64 ones are masked to it, so the bits agree (and no int64 multiply
    # is emulated per token).
    x = x.to(tl.uint32) * 747796405 + 2891336453
    x = ((x >> ((x >> 28) + 4)) ^ x) * 277803737
    return (x >> 22) ^ x


@triton.jit
def _scaled_logit_and_bits(ROW, cols, end, key, t):
    # z = fp32(logit / T) as the reference divides (div_rn: Triton's fp32 ``/`` is div.full.f32, 2 ulp),
    # and the token's 32 noise bits.
    logit = tl.load(ROW + cols, mask=cols < end, other=0.0)
    return tl.math.div_rn(logit, t), _hash32(key.to(tl.uint32) ^ _hash32(cols))


@triton.jit
def _gumbel64(bits):
    """The reference's Gumbel noise of the 32 bits: -log(-log(u)), u = (bits + 0.5) / 2^32, in float64."""
    u = (bits.to(tl.float64) + 0.5) / 4294967296.0
    return -tl.log(-tl.log(u))


# Compiled, the float32 logs are the SFU's lg2.approx (one instruction; libdevice's logf is ~45), whose absolute
# error is 2^-22 in log2 units; the interpreter has no inline PTX and takes tl.log.
APPROX_LOG = tl.constexpr(not INTERPRET) if HAVE_TRITON else False


@triton.jit
def _log32(x):
    if APPROX_LOG:
        lg2 = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                        pack=1)
        return lg2 * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _gumbel32(bits):
    """-log(-log(u)), u = (bits + 0.5) / 2^32, in float32 (``_score32_error`` bounds its distance from the
    float64 value), with two logs. Where u is near 1, float32 holds too few of its digits for log(u), and an
    absolute error of the log is a large relative one of e = -log(u): there e comes from t = 1 - u, formed
    from the integer 2^32 - bits, as log(1 - t) above t = 2^-4 and as its series below (truncated at t^4:
    a relative error of t^4 / 5 <= 3e-6, as the log's 2^-22 * ln 2 / t is at the switch)."""
    u = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    t = ((0 - bits).to(tl.float32) - 0.5) * 2.3283064365386963e-10  # 0 - bits wraps to 2^32 - bits
    series = t + t * t * (0.5 + t * (0.3333333333333333 + t * 0.25))
    low = bits < 2147483648
    e = tl.where(low | (t >= 0.0625), -_log32(tl.where(low, u, 1.0 - t)), series)
    return -_log32(e)


@triton.jit
def _score32(z, bits, mask):
    """The float32 score; masked-off and NaN tokens at -inf (the float64 pass never picks them either)."""
    s = z + _gumbel32(bits)
    return tl.where(mask & (s == s), s, -float("inf"))


@triton.jit
def _score32_error(s):
    # A bound of |float32 score - float64 score|. _gumbel32 is within about 5e-6 of the float64 noise
    # (e within 3e-6 relative, above; the outer log adds 2^-22 * ln 2): 1e-4 is 20 times that. The float32
    # sum z + g adds |s| * 2^-24: 2^-20 is used. reach = s + this bound grows with s.
    return 1e-4 + tl.abs(s) * 9.5367431640625e-07


@triton.jit
def _gumbel_argmax_kernel(LOGITS, TEMPERATURES, KEYS, OUT, PART_SCORE, PART_TOKEN, stride_b, V, chunk, MIN_T,
                          BLOCK_V: tl.constexpr, BLOCKS_POW2: tl.constexpr, SPLIT: tl.constexpr,
                          USE_PDL: tl.constexpr):
    # Program (b, s) takes row b's tokens [s * chunk, (s + 1) * chunk): one row alone would leave all
    # but one SM idle. With SPLIT its best (score, token) goes to the partials, which
    # _gumbel_argmax_combine_kernel reduces; without it (one split) straight to OUT.
    pdl_entry(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    t = tl.load(TEMPERATURES + b)
    key = tl.load(KEYS + b)
    greedy = t == 0.0
    t = tl.maximum(t, MIN_T)
    lanes = tl.arange(0, BLOCK_V)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    # Per lane, the best score and its token over the blocks seen (strictly greater: the earlier
    # block keeps a tie); then the first token among the lanes' best, as torch.argmax picks. A lane that
    # never beats -inf keeps token 0: a row of -inf gives 0, as torch.argmax does.
    best = tl.full([BLOCK_V], -float("inf"), tl.float64)
    best_token = tl.zeros([BLOCK_V], tl.int64)
    if greedy:  # greedy: the logits' argmax, no noise to compute
        for block in range(start, end, BLOCK_V):
            cols = block + lanes
            score = tl.load(LOGITS + b * stride_b + cols, mask=cols < end, other=-float("inf")).to(tl.float64)
            better = score > best
            best = tl.where(better, score, best)
            best_token = tl.where(better, cols.to(tl.int64), best_token)
    else:
        # One float32 pass scores every token (cheap: approximate logs) and keeps each block's best; then
        # float64 (the reference's numbers) rescores only the blocks whose best can still reach the split's,
        # typically one or two, in block order (so the earlier block keeps a tie, as above).
        top32 = tl.full([BLOCK_V], -float("inf"), tl.float32)
        block_ids = tl.arange(0, BLOCKS_POW2)
        block_best = tl.full([BLOCKS_POW2], -float("inf"), tl.float32)
        for block in range(start, end, BLOCK_V):
            cols = block + lanes
            z, bits = _scaled_logit_and_bits(LOGITS + b * stride_b, cols, end, key, t)
            s32 = _score32(z, bits, cols < end)
            top32 = tl.maximum(top32, s32)
            block_best = tl.where(block_ids == (block - start) // BLOCK_V, tl.max(s32, axis=0), block_best)
        best32 = tl.max(top32, axis=0)
        floor = tl.where(best32 == float("inf"), best32, best32 - _score32_error(best32))
        reach = tl.where(block_best == -float("inf"), block_best, block_best + _score32_error(block_best))
        pending = (block_ids < tl.cdiv(end - start, BLOCK_V)) & (reach >= floor)
        i = tl.min(tl.where(pending, block_ids, BLOCKS_POW2), axis=0)
        while i < BLOCKS_POW2:
            cols = start + i * BLOCK_V + lanes
            z, bits = _scaled_logit_and_bits(LOGITS + b * stride_b, cols, end, key, t)
            score = tl.where(cols < end, z.to(tl.float64) + _gumbel64(bits), -float("inf"))
            better = score > best
            best = tl.where(better, score, best)
            best_token = tl.where(better, cols.to(tl.int64), best_token)
            pending = pending & (block_ids != i)
            i = tl.min(tl.where(pending, block_ids, BLOCKS_POW2), axis=0)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_token, V), axis=0)
    if SPLIT:
        n_splits = tl.num_programs(1)
        tl.store(PART_SCORE + b * n_splits + split, top)
        tl.store(PART_TOKEN + b * n_splits + split, token)
    else:
        tl.store(OUT + b, token)


@triton.jit
def _gumbel_argmax_combine_kernel(PART_SCORE, PART_TOKEN, OUT, V, n_splits, SPLITS_POW2: tl.constexpr,
                                  USE_PDL: tl.constexpr):
    # The splits' best: the highest score, and of its ties the lowest token (splits hold ascending tokens,
    # so that is the row's first index, as a single pass picks).
    pdl_entry(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_POW2)
    mask = s < n_splits
    score = tl.load(PART_SCORE + b * n_splits + s, mask=mask, other=-float("inf"))
    token = tl.load(PART_TOKEN + b * n_splits + s, mask=mask, other=V)
    top = tl.max(score, axis=0)
    tl.store(OUT + b, tl.min(tl.where(score == top, token, V), axis=0))


def num_splits_for(rows: int, vocab: int, sms: int) -> int:
    """Vocabulary splits per row: enough programs for two per SM, each at least one BLOCK_V block; one
    split (no combine kernel) once the rows alone fill the GPU."""
    blocks = -(-vocab // BLOCK_V)
    return max(1, min(-(-2 * sms // max(rows, 1)), blocks))


SMS_INTERPRETED = 2  # the interpreter's stand-in SM count: tiny vocabularies still split (guard.sm_count)


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
    vocab = logits.shape[1]
    if rows == 0 or vocab == 0:
        return out
    splits = num_splits_for(rows, vocab, sm_count(logits.device, SMS_INTERPRETED))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), BLOCK_V) * BLOCK_V  # whole blocks per split
    splits = triton.cdiv(vocab, chunk)
    part_score = torch.empty((rows, splits), dtype=torch.float64, device=logits.device)
    part_token = torch.empty((rows, splits), dtype=torch.int64, device=logits.device)
    _gumbel_argmax_kernel[(rows, splits)](logits, temperatures, noise_keys, out, part_score, part_token,
                                          logits.stride(0), vocab, chunk, MIN_TEMPERATURE, BLOCK_V=BLOCK_V,
                                          # (the whole vocabulary's blocks: one compile per vocabulary, any split)
                                          BLOCKS_POW2=triton.next_power_of_2(triton.cdiv(vocab, BLOCK_V)),
                                          SPLIT=splits > 1, num_warps=8, **pdl_launch(logits))
    if splits > 1:
        _gumbel_argmax_combine_kernel[(rows,)](part_score, part_token, out, vocab, splits,
                                               SPLITS_POW2=triton.next_power_of_2(splits), num_warps=1,
                                               **pdl_launch(logits))
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


# ---- top-k / top-p: thresholds found by counting, not by sorting -----------------------------------
#
# ``sample(logits, temperatures, top_ks, top_ps, noise_keys)`` keeps, per row, the tokens whose scaled
# logit z = fp32(logit / max(T, MIN_TEMPERATURE)) is at least a threshold, then takes the same Gumbel-max
# argmax as ``gumbel_argmax`` over the kept tokens (same noise: a request's tokens do not depend on its
# batch). The kept set, defined by values so that no sort is needed and ties cannot depend on one:
#   top-k (0 < k < V): z >= z_(k), the k-th largest z counting repeats; tokens tied with it are all kept.
#   top-p (p < 1), over the top-k set K: each token's mass is its probability relative to the top token
#     in whole units of 2^-32, w = trunc(exp(float64(z) - float64(max z)) * 2^32), an integer, so a sum of
#     masses is exact in any order; S = the sum over K. Kept: z >= the largest value d of K whose suffix
#     mass (w summed over z >= d) reaches p * S (float64). That is the smallest prefix of K sorted by
#     probability whose mass reaches p, the boundary token's ties all kept; the top token always stays.
# The kernel (one program per row, after ``gumbel_argmax``; rows without top-k/top-p, and greedy ones,
# keep its token: one pass) reads the row for max z and a histogram of the top BIN_BITS bits of the
# order-preserving integer key of z, which brackets each threshold between two bin edges (exactly for
# counts; with integer bounds for masses). A multiway bisection on the key narrows the bracket: each pass
# counts the tokens (or sums the masses) above SEARCH_PIVOTS pivots and snaps the bracket to the keys
# present. The first pass over the row also copies the (at most CANDIDATES) tokens of the top bins that
# can hold them, with a pivot at their bound: if the threshold lies above it, later passes and the final
# Gumbel-max read the copies only. Typically (top-k 50, top-p 0.9, both) that is three reads of the row
# in all (gumbel_argmax's, the histogram's, one search pass) and a few passes over the candidates.

SEARCH_PIVOTS = 8
CANDIDATES = 8192
# One program per row (16 warps; ptxas for sm_90: 128 registers, ~300 bytes of spills; search blocks
# of 2048 spill ~850): blocks as large as that holds.
BLOCK_ROW = 4096  # the first and last passes
BLOCK_SEARCH = 1024  # the search passes, which compare [BLOCK_SEARCH, SEARCH_PIVOTS] tiles
# Loads issued this many blocks ahead (cp.async into shared memory, 96 KB at these blocks): one block in
# flight per SM would leave a pass bound by DRAM latency, not bandwidth.
PIPELINE_STAGES = 3
BIN_BITS = 12  # the first pass's histogram of keys: sign, exponent and 3 mantissa bits (1/8 binade)
MASS_UNIT = 2.0**32  # masses are integers below V * 2^32 < 2^53: float64 sums of them are exact


@triton.jit
def _order_key(z):
    # fp32 -> int32 with the same order (-0 and +0 one key, as they compare equal).
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(z == 0.0, 0, key).to(tl.int64)


@triton.jit
def _key_value(key):
    k = key.to(tl.int32)
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _load_scaled(ROW, CZ, CI, from_row, start, n, t, BLOCK: tl.constexpr):
    # Block ``start`` of the row's scaled logits (from the logits) or of its candidates (from the buffer):
    # the other load is masked off and reads nothing.
    pos = start + tl.arange(0, BLOCK)
    mask = pos < n
    # (A scalar condition joins a vector one through ``where``: the interpreter's ``&`` of the two is an int.)
    logit = tl.load(ROW + pos, mask=tl.where(from_row != 0, mask, False), other=0.0)
    cand = tl.load(CZ + pos, mask=tl.where(from_row == 0, mask, False), other=0.0)
    token = tl.load(CI + pos, mask=tl.where(from_row == 0, mask, False), other=0)
    z = tl.where(from_row != 0, tl.math.div_rn(logit, t), cand)  # IEEE, as torch divides (not div.full)
    return z, tl.where(from_row != 0, pos, token).to(tl.int64), mask


@triton.jit
def _gumbel_score(z, token, key):
    # gumbel_argmax's score: the same noise of (row key, token id), the same float64 sum.
    return z.to(tl.float64) + _gumbel64(_hash32(key ^ _hash32(token)))


@triton.jit
def _mass(z, m):
    # The integer mass (float64) of scaled logit z under max m: kept_tokens' MASS_UNIT units.
    return tl.floor(tl.exp(z.to(tl.float64) - m.to(tl.float64)) * 4294967296.0)


@triton.jit
def _pivots(lo, hi, vmin, it, NP: tl.constexpr):
    # NP pivots in (lo, hi), non-decreasing: even in value while the interval spans more than a binade
    # (2^23 keys; keys are dense near 0 and sparse far from it), for at most 4 passes (a far outlier
    # could make value splits slow), then even in key: at most 8 more passes of 8 pivots reach one key.
    j = tl.arange(0, NP).to(tl.int64) + 1
    span = hi - lo
    by_key = lo + (span * j + NP) // (NP + 1)
    vlo = tl.maximum(_key_value(lo), vmin)
    vhi = _key_value(hi - 1)
    by_value = _order_key(vlo + (vhi - vlo) * (j.to(tl.float32) / (NP + 1)))
    piv = tl.where(tl.where(it < 4, span > 8388608, False), by_value, by_key)
    return tl.minimum(tl.maximum(piv, lo + 1), hi - 1)


@triton.jit
def _threshold(ROW, CZ, CI, from_row, n, t, m, vmin, floor, lo, hi, above_lo, spec, target, top_p,
               MASS: tl.constexpr, NP: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
               STAGES: tl.constexpr):
    """The largest key x with f(x) >= target, for f(x) = the count (MASS False) or the mass (True) of the
    tokens with key >= max(x, floor); given f(lo) >= target > f(hi) and at most ``above_lo`` tokens at
    or above lo. For the mass, ``target`` is computed by the first pass, top_p * S (S: the mass of all
    tokens with key >= floor). Also returns where the tokens are read from next and how many: each pass
    over the row copies the tokens at or above lo if at most CAP are, else those at or above ``spec``
    (at most CAP are), and reads the copies from then on if its own new lo is not below them."""
    it = 0
    while hi - lo > 1:
        piv = _pivots(lo, hi, vmin, it, NP)
        # On the row, one pivot at ``spec`` decides whether this pass's copy can serve.
        at_spec = tl.where(from_row != 0, tl.where(spec > lo, spec < hi, False), False)
        piv = tl.where(tl.where(at_spec, tl.arange(0, NP) == 0, False), spec, piv)
        piv_value = _key_value(piv)
        copy = from_row != 0
        copy_from = tl.where(above_lo <= CAP, lo, spec)
        # Reduced every block (registers for [NP], not [BLOCK, NP]); integer sums, so exact in any order:
        # counts below 2^24 in float32, masses below 2^53 in float64.
        count = tl.zeros([NP], tl.float32)
        mass = tl.zeros([NP], tl.float64)
        total = tl.zeros([], tl.float64)
        dmin = tl.full([BLOCK], 2**62, tl.int64)
        dmax = tl.full([BLOCK], -2**62, tl.int64)
        copied = 0
        for start in tl.range(0, n, BLOCK, num_stages=STAGES):
            z, token, mask = _load_scaled(ROW, CZ, CI, from_row, start, n, t, BLOCK)
            key = _order_key(z)
            mask = mask & (key >= floor)
            # Comparing values is comparing keys (pivots are never -0 bar key -1, which orders alike).
            ge = (z[:, None] >= piv_value[None, :]) & mask[:, None]
            count += tl.sum(ge.to(tl.float32), 0)
            if MASS:
                w = tl.where(mask, _mass(z, m), 0.0)
                mass += tl.sum(tl.where(ge, w[:, None], 0.0), 0)
                total += tl.sum(w, 0)
                live = w > 0
            else:
                live = mask
            live = live & (key >= lo) & (key < hi)
            dmin = tl.minimum(dmin, tl.where(live, key, 2**62))
            dmax = tl.maximum(dmax, tl.where(live, key, -2**62))
            if copy:
                keep = mask & (key >= copy_from)
                at = copied + tl.cumsum(keep.to(tl.int32), 0) - 1
                tl.store(CZ + at, z, mask=keep)
                tl.store(CI + at, token.to(tl.int32), mask=keep)
                copied += tl.sum(keep.to(tl.int32), 0)
        count_at = count
        if MASS:
            if it == 0:
                target = top_p.to(tl.float64) * total
            f = mass
        else:
            f = count_at.to(tl.float64)
        ok = f >= target
        # f falls as x grows, so the pivots that reach the target all lie below those that do not
        # (in any order: ``spec`` may come first).
        new_lo = tl.max(tl.where(ok, piv, lo), 0)
        new_hi = tl.min(tl.where(ok, hi, piv), 0)
        above_lo = tl.min(tl.where(ok, count_at, above_lo.to(tl.float32)), 0).to(tl.int32)
        # No counted token lies in [lo, dmin) or (dmax, hi): f is the same there, so snap to the data.
        lo = tl.maximum(new_lo, tl.min(dmin, 0))
        hi = tl.minimum(new_hi, tl.max(dmax, 0) + 1)
        copied_all = tl.where(copy, lo >= copy_from, False)  # all tokens that can still be kept
        n = tl.where(copied_all, copied, n)
        from_row = tl.where(copied_all, 0, from_row)
        it += 1
    return lo, from_row, n


@triton.jit
def _top_k_top_p_kernel(LOGITS, TEMPERATURES, TOP_KS, TOP_PS, KEYS, CZ, CI, OUT, stride_b, V, MIN_T,
                        NP: tl.constexpr, CAP: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK: tl.constexpr,
                        BINS: tl.constexpr, BIN_SHIFT: tl.constexpr, STAGES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(TEMPERATURES + b)
    top_k = tl.load(TOP_KS + b)
    top_p = tl.load(TOP_PS + b)
    use_k = tl.where(top_k > 0, top_k < V, False)
    use_p = top_p < 1.0
    if tl.where(t > 0.0, tl.where(use_k, True, use_p), False):  # else gumbel_argmax's token stands
        t = tl.maximum(t, MIN_T)
        row = LOGITS + b * stride_b
        cz = CZ + b * CAP
        ci = CI + b * CAP
        from_row = tl.full([], 1, tl.int32)  # 1: read the row; 0 once the candidates are copied
        hist = tl.zeros([BINS], tl.int32)
        zmax = tl.full([BLOCK_V], -float("inf"), tl.float32)
        zmin = tl.full([BLOCK_V], float("inf"), tl.float32)
        finite_min = tl.full([BLOCK_V], float("inf"), tl.float32)
        for start in tl.range(0, V, BLOCK_V, num_stages=STAGES):
            z, token, mask = _load_scaled(row, cz, ci, from_row, start, V, t, BLOCK_V)
            zmax = tl.maximum(zmax, tl.where(mask, z, -float("inf")))
            zmin = tl.minimum(zmin, tl.where(mask, z, float("inf")))
            finite_min = tl.minimum(finite_min, tl.where(mask & (z > -float("inf")), z, float("inf")))
            hist += tl.histogram(((_order_key(z) + 2**31) >> BIN_SHIFT).to(tl.int32), BINS, mask=mask)
        m = tl.max(zmax, 0)
        vmin = tl.min(finite_min, 0)
        top = _order_key(m)
        bottom = _order_key(tl.min(zmin, 0))
        # The histogram of the keys' top bits brackets each threshold between two bin edges before any
        # search pass, so that the first one can already copy the candidates.
        edge = (tl.arange(0, BINS).to(tl.int64) << BIN_SHIFT) - 2**31  # each bin's smallest key
        above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # tokens with key >= edge
        spec = tl.min(tl.where(above <= CAP, edge, 2**31), 0)  # the most bins that CAP tokens can hold
        n = V
        tau_k = bottom
        if use_k:
            reach = above >= top_k
            lo = tl.maximum(tl.max(tl.where(reach, edge, bottom), 0), bottom)
            hi = tl.minimum(tl.min(tl.where(reach, top + 1, edge), 0), top + 1)
            tau_k, from_row, n = _threshold(row, cz, ci, from_row, n, t, m, vmin, bottom, lo, hi,
                                            tl.min(tl.where(reach, above, V), 0), spec, top_k.to(tl.float64), top_p,
                                            False, NP, CAP, BLOCK, STAGES)
        tau = tau_k
        if use_p:
            # Integer bounds of each bin's mass (its count times the masses at its ends), exact in float64:
            # a lower bound of the suffix mass that reaches p * (an upper bound of S) is a valid lo, an
            # upper bound below p * (a lower bound of S) a valid hi.
            whole = edge >= tau_k  # bins entirely at or above the floor
            count = tl.where(edge + (1 << BIN_SHIFT) > tau_k, hist, 0).to(tl.float64)
            # (Ends clamped to the data's keys: the keys beyond them include NaNs.)
            first = _key_value(tl.minimum(tl.maximum(edge, bottom), top))
            last = _key_value(tl.minimum(tl.maximum(edge + (1 << BIN_SHIFT) - 1, bottom), top))
            low = tl.where(whole & (hist > 0), count * _mass(first, m), 0.0)
            high = tl.where(hist > 0, count * _mass(last, m), 0.0)
            low_above = tl.sum(low, 0) - tl.cumsum(low, 0) + low
            high_above = tl.sum(high, 0) - tl.cumsum(high, 0) + high
            reach = whole & (low_above >= top_p.to(tl.float64) * tl.sum(high, 0))
            lo = tl.maximum(tl.max(tl.where(reach, edge, tau_k), 0), tau_k)
            short = high_above < top_p.to(tl.float64) * tl.sum(low, 0)
            hi = tl.minimum(tl.min(tl.where(short, edge, top + 1), 0), top + 1)
            tau, from_row, n = _threshold(row, cz, ci, from_row, n, t, m, vmin, tau_k, lo, hi,
                                          tl.min(tl.where(reach, above, n), 0), spec, top_p.to(tl.float64), top_p,
                                          True, NP, CAP, BLOCK, STAGES)
        tau = tl.minimum(tau, top)  # the top token always stays (top_p may be 0 in float32)
        key_b = tl.load(KEYS + b)
        best = tl.full([BLOCK_V], -float("inf"), tl.float64)
        best_token = tl.zeros([BLOCK_V], tl.int64)
        for start in tl.range(0, n, BLOCK_V, num_stages=STAGES):
            z, token, mask = _load_scaled(row, cz, ci, from_row, start, n, t, BLOCK_V)
            score = _gumbel_score(z, token, key_b)
            score = tl.where(mask & (_order_key(z) >= tau), score, -float("inf"))
            # Candidates are in token order, as the row is: strictly greater keeps the first of a tie.
            better = score > best
            best = tl.where(better, score, best)
            best_token = tl.where(better, token, best_token)
        top_score = tl.max(best, axis=0)
        tl.store(OUT + b, tl.min(tl.where(best == top_score, best_token, V), axis=0))


def _check_row_vector(op: str, name: str, t: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype):
    rows = logits.shape[0]
    if t.shape != (rows,) or t.dtype != dtype or t.device != logits.device:
        raise ValueError(f"{op}: {name} {tuple(t.shape)} {t.dtype} on {t.device} must be [{rows}] {dtype} on "
                         f"the logits' device")


# The top-k/top-p kernel is exact against sample_ref under the interpreter, but its GPU tests have not run
# yet (kernels/NOTES.md): until they pass on the box, CUDA tensors draw the filtered rows with the reference
# (the same tokens, a sort's cost) and the tests switch this on to check the kernel.
FILTER_KERNEL_ON_GPU = False


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
           noise_keys: torch.Tensor) -> torch.Tensor:
    """Sampled token ids [B] (int64) from ``logits`` [B, V] (fp32), per-row ``temperatures`` (fp32; 0 is
    greedy), ``top_ks`` (int64; <= 0 or >= V: off), ``top_ps`` (fp32; >= 1: off) and ``noise_keys``
    (int64 in [0, 2^32)); the kept set is defined above ``SEARCH_PIVOTS``. No host synchronisation and no
    control flow on the values: a CUDA graph can capture it. Two launches: ``gumbel_argmax`` for every
    row, then the top-k/top-p kernel, which returns at once for rows that need neither."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"sample: logits {tuple(logits.shape)} {logits.dtype} must be [B, V] float32")
    check_tensors("sample", logits=logits)
    for name, t, dtype in (("temperatures", temperatures, torch.float32), ("top_ks", top_ks, torch.int64),
                           ("top_ps", top_ps, torch.float32), ("noise_keys", noise_keys, torch.int64)):
        _check_row_vector("sample", name, t, logits, dtype)
    if not use_triton(logits):
        return sample_ref(logits, temperatures, top_ks, top_ps, noise_keys)
    out = gumbel_argmax(logits, temperatures, noise_keys)
    rows = logits.shape[0]
    if logits.is_cuda and not FILTER_KERNEL_ON_GPU:
        filtered = (temperatures > 0) & (((top_ks > 0) & (top_ks < logits.shape[1])) | (top_ps < 1))
        return torch.where(filtered, sample_ref(logits, temperatures, top_ks, top_ps, noise_keys), out)
    if rows:
        cand_z = torch.empty(rows, CANDIDATES, dtype=torch.float32, device=logits.device)
        cand_i = torch.empty(rows, CANDIDATES, dtype=torch.int32, device=logits.device)
        _top_k_top_p_kernel[(rows,)](logits, temperatures, top_ks, top_ps, noise_keys, cand_z, cand_i, out,
                                     logits.stride(0), logits.shape[1], MIN_TEMPERATURE, NP=SEARCH_PIVOTS,
                                     CAP=CANDIDATES, BLOCK_V=BLOCK_ROW, BLOCK=BLOCK_SEARCH, BINS=2**BIN_BITS,
                                     BIN_SHIFT=32 - BIN_BITS, STAGES=PIPELINE_STAGES, num_warps=16)
    return out


def kept_tokens(z: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """The top-k/top-p kept set [B, V] (bool) of scaled logits ``z`` (fp32), as defined above
    ``SEARCH_PIVOTS``: here with a sort, whose order among ties cannot matter (thresholds are values)."""
    vocab = z.shape[-1]
    ordered = z.sort(-1, descending=True).values
    k = torch.where((top_ks > 0) & (top_ks < vocab), top_ks, vocab)
    tau_k = ordered.gather(-1, (k - 1)[:, None])
    top = ordered[:, :1]
    in_k = ordered >= tau_k
    mass = torch.where(in_k, torch.floor(torch.exp(ordered.double() - top.double()) * MASS_UNIT), 0.0).cumsum(-1)
    # The first sorted position whose suffix mass (the prefix here) reaches p * S is the threshold value.
    reaches = mass >= top_ps.double()[:, None] * mass[:, -1:]
    tau_p = ordered.gather(-1, reaches.int().argmax(-1, keepdim=True))
    tau = torch.where((top_ps < 1)[:, None], torch.maximum(tau_k, tau_p), tau_k)
    return (z >= tau) | (z == top)


def sample_ref(logits, temperatures, top_ks, top_ps, noise_keys):
    """``sample`` in eager torch: ``gumbel_argmax_ref``'s draw over the kept tokens only."""
    z = logits / temperatures.clamp(min=MIN_TEMPERATURE)[:, None]
    gumbel = -torch.log(-torch.log(token_noise(noise_keys, logits.shape[-1])))
    scores = (z.double() + gumbel).masked_fill(~kept_tokens(z, top_ks, top_ps), float("-inf"))
    return torch.where(temperatures > 0, scores.argmax(-1), logits.argmax(-1))
