"""Token sampling with counter-based randomness.

Each sample has a 64-bit seed (its request's, or one drawn from the engine's seed; see
``sample_seed`` for n > 1). The noise for its n-th generated token is a hash of (seed, n, token
id), so a request samples the same tokens whatever else is in its batch, across preemptions, on
any device: the hash is int64 arithmetic whose products stay below 2^63, exact on CPU and GPU.
Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel noise) draws from softmax(logits / T).
"""
import torch
from torch import nn

import kernels
from kernels.sampling import MASK32, hash32_ref, token_noise

_MASK64 = 2**64 - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # SplitMix64's increment


def noise_keys(seeds, steps):
    """Each row's 32-bit noise key, of (seed, step) alone. Both 32-bit halves of the int64 seed go
    in, through bijections, so every bit of it counts. Plain integer arithmetic: int64 torch tensors
    or numpy arrays alike (the decode step computes its keys on the host, with its other inputs)."""
    return hash32_ref(hash32_ref(hash32_ref(seeds & MASK32) ^ ((seeds >> 32) & MASK32)) ^ (steps & MASK32))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise ``[B, V]`` determined by (seed, step, token id) alone."""
    return token_noise(noise_keys(seeds, steps), vocab_size)


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
        if temperatures is None:
            return logits.argmax(-1)
        return self.sample_in_graph(logits, temperatures, top_ks, top_ps, seeds, steps)

    def sample_in_graph(self, logits, temperatures, top_ks, top_ps, seeds, steps):
        """The same draw with every input a tensor (greedy rows: temperature 0) and no host sync, so a
        CUDA graph can capture it: ``kernels.sample`` (one pass for rows without top-k/top-p, a few
        more with them; its torch reference on CPU)."""
        return kernels.sample(logits, temperatures, top_ks, top_ps, noise_keys(seeds, steps))
