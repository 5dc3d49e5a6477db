"""The one-pass sampler kernel (``kernels.gumbel_argmax``) against its torch reference, which the
engine's sampler ran before: the same tokens for the same (logits, temperatures, seeds, steps).

Under Triton's interpreter on CPU, compiled on a GPU (see tests/kernel_testing.py)."""
import pytest
import torch

from tests.kernel_testing import DEVICE, kernel_test_setup, select_interpreter

select_interpreter()

from kernels import gumbel_argmax, gumbel_argmax_ref  # noqa: E402
from minivllm.layers.sampler import noise_keys  # noqa: E402

ON_TRITON, runs_kernels, test_cpu_kernels_in_fresh_process = kernel_test_setup(__file__)


def sampling_inputs(rows, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(DEVICE)
    temperatures = torch.rand(rows, generator=gen).to(DEVICE) * 1.5
    temperatures[::3] = 0.0  # greedy rows in the same batch
    seeds = torch.randint(-2**63, 2**63 - 1, (rows,), generator=gen, dtype=torch.int64).to(DEVICE)
    steps = torch.randint(0, 4096, (rows,), generator=gen).to(DEVICE)
    return logits, temperatures, noise_keys(seeds, steps)


@runs_kernels
@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("vocab", [37, 2048, 5000])  # one masked block; exactly one block; blocks and a tail
def test_gumbel_argmax_picks_the_references_tokens(rows, vocab):
    logits, temperatures, keys = sampling_inputs(rows, vocab, seed=rows * 1000 + vocab)
    got = gumbel_argmax(logits, temperatures, keys)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, gumbel_argmax_ref(logits, temperatures, keys))
    greedy = temperatures == 0
    assert torch.equal(got[greedy], logits[greedy].argmax(-1))


@runs_kernels
def test_gumbel_argmax_samples_a_tie_as_the_reference_does():
    # A flat row at a tiny temperature: noise decides; an all-equal greedy row: the first index wins.
    logits = torch.zeros(2, 3000, device=DEVICE)
    temperatures = torch.tensor([1e-7, 0.0], device=DEVICE)
    keys = torch.tensor([12345, 678], device=DEVICE)
    got = gumbel_argmax(logits, temperatures, keys)
    assert torch.equal(got, gumbel_argmax_ref(logits, temperatures, keys))
    assert got[1] == 0


def test_gumbel_argmax_draws_from_the_softmax():
    # The reference's Gumbel-max draws follow softmax(logits / T): over many keys, token frequencies
    # match the probabilities (this is what the kernel reproduces bit for bit above).
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    temperatures = torch.full((20000,), 0.7)
    keys = noise_keys(torch.arange(20000), torch.zeros(20000, dtype=torch.int64))
    counts = torch.bincount(gumbel_argmax_ref(logits, temperatures, keys), minlength=4).double() / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0].double() / 0.7, -1), atol=0.01, rtol=0)


def test_gumbel_argmax_rejects_bad_inputs():
    logits, temperatures, keys = sampling_inputs(3, 50, seed=1)
    with pytest.raises(ValueError, match="float32"):
        gumbel_argmax(logits.double(), temperatures, keys)
    with pytest.raises(ValueError, match="temperatures"):
        gumbel_argmax(logits, temperatures[:2], keys)
    with pytest.raises(ValueError, match="noise_keys"):
        gumbel_argmax(logits, temperatures, keys.int())
