"""The one-pass sampler kernel (``kernels.gumbel_argmax``) against its torch reference, which the
engine's sampler ran before: the same tokens for the same (logits, temperatures, seeds, steps); and
``kernels.sample`` (top-k/top-p thresholds by counting, no sort) against ``sample_ref``.

Under Triton's interpreter on CPU, compiled on a GPU (see tests/kernel_testing.py)."""
import pytest
import torch

from tests.kernel_testing import DEVICE, kernel_test_setup, select_interpreter

select_interpreter()

import kernels.sampling  # noqa: E402
from minivllm.checks import FLOAT32_MAX  # noqa: E402
from kernels import gumbel_argmax, gumbel_argmax_ref, sample, sample_ref  # noqa: E402
from kernels.sampling import kept_tokens  # noqa: E402
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


@runs_kernels
def test_gumbel_argmax_takes_the_first_of_maxima_tied_across_vocabulary_splits():
    block = kernels.sampling.BLOCK_V
    vocab = 3 * block + 5
    logits = torch.full((3, vocab), -1.0, device=DEVICE)
    logits[0, [2 * block + 7, block + 3]] = 4.0  # one maximum in each of the two splits
    logits[1:] = -float("inf")
    logits[1, -1] = 0.0  # the only finite logit: in the last split's tail
    temperatures = torch.zeros(3, device=DEVICE)
    keys = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    if DEVICE == "cpu":  # the interpreter's stand-in SM count splits these rows in two
        assert kernels.sampling.num_splits_for(3, vocab, kernels.sampling.SMS_INTERPRETED) == 2
    got = gumbel_argmax(logits, temperatures, keys)
    assert got.tolist() == [block + 3, vocab - 1, 0]  # row 2, all -inf: 0, as torch.argmax
    assert torch.equal(got, gumbel_argmax_ref(logits, temperatures, keys))


@runs_kernels
def test_gumbel_argmax_breaks_a_near_tie_that_float32_cannot_see():
    # Two tokens, in different blocks, whose float64 scores differ by about 1e-7: the float32 pre-screen
    # cannot order them, so both blocks must reach the float64 pass, which must pick as the reference does.
    block = kernels.sampling.BLOCK_V
    vocab = 3 * block
    keys = torch.tensor([987654321, 13579], dtype=torch.int64)
    gumbel = -torch.log(-torch.log(kernels.sampling.token_noise(keys, vocab)))
    logits = torch.full((2, vocab), -30.0, dtype=torch.float32)
    for row, (a, b) in enumerate([(5, 2 * block + 9), (block + 1, 3 * block - 1)]):
        logits[row, a] = float(10.0 - gumbel[row, a])
        logits[row, b] = float(10.0 - gumbel[row, b] + 2e-7)
    temperatures = torch.ones(2)
    want = gumbel_argmax_ref(logits, temperatures, keys)
    got = gumbel_argmax(logits.to(DEVICE), temperatures.to(DEVICE), keys.to(DEVICE))
    assert torch.equal(got.cpu(), want)


@runs_kernels
def test_float32_gumbel_noise_is_within_its_bound_everywhere():
    # _gumbel32 over the ends of the bit range (u near 0 and near 1, where float32 alone loses digits),
    # the branch edges and random bits, against the float64 noise: well inside the pre-screen's 1e-4.
    import triton
    import triton.language as tl

    @triton.jit
    def noise_kernel(BITS, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        bits = tl.load(BITS + offs, mask=offs < n, other=0).to(tl.uint32)
        tl.store(OUT + offs, kernels.sampling._gumbel32(bits), mask=offs < n)

    edges = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1] + [2**32 - 2**k for k in range(1, 32)]
    edges += [2**32 - int(2**32 * t) for t in (2.0**-7, 2.0**-7 * 1.001, 2.0**-7 * 0.999)]
    random_bits = torch.randint(0, 2**32, (20000,), generator=torch.Generator().manual_seed(5))
    bits = torch.cat([torch.tensor(edges), random_bits])
    out = torch.empty(len(bits), dtype=torch.float32, device=DEVICE)
    noise_kernel[(triton.cdiv(len(bits), 1024),)](bits.to(DEVICE), out, len(bits), BLOCK=1024)
    exact = -torch.log(-torch.log((bits.double() + 0.5) / 2.0**32))
    assert (out.cpu().double() - exact).abs().max() < 1e-5


def test_vocabulary_splits_fill_the_gpu_only_while_the_rows_do_not():
    qwen3_vocab, h200_sms = 151936, 132
    blocks = -(-qwen3_vocab // kernels.sampling.BLOCK_V)
    assert kernels.sampling.num_splits_for(1, qwen3_vocab, h200_sms) == blocks  # one block per program
    assert kernels.sampling.num_splits_for(8, qwen3_vocab, h200_sms) == 33  # ceil(2 * 132 / 8)
    assert kernels.sampling.num_splits_for(264, qwen3_vocab, h200_sms) == 1
    assert kernels.sampling.num_splits_for(1, 37, h200_sms) == 1  # never more splits than blocks


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


def filtered_inputs(rows, vocab, seed, ties=False, banned=False):
    """Rows of every kind: greedy, plain, k = 1, 2, 50, V - 1, V (off), p tiny (0 in float32), 0.999,
    1 (off), random k and p, both; integer logits for ties; every third token -inf (banned)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    if ties:
        logits = logits.round()
    if banned:
        logits[:, 1::3] = float("-inf")
    temperatures = torch.rand(rows, generator=gen) * 1.5
    temperatures[::5] = 0.0
    top_ks = torch.randint(1, vocab + 1, (rows,), generator=gen)
    top_ks[::4] = torch.tensor([1, vocab, vocab - 1, 2, 50, -1, 0])[torch.arange(len(top_ks[::4])) % 7]
    top_ps = torch.rand(rows, generator=gen)
    top_ps[::3] = 1.0
    top_ps[1::7] = 1e-30
    top_ps[2::7] = 0.999
    seeds = torch.randint(-2**63, 2**63 - 1, (rows,), generator=gen, dtype=torch.int64)
    keys = noise_keys(seeds, torch.randint(0, 4096, (rows,), generator=gen))
    return [x.to(DEVICE) for x in (logits, temperatures, top_ks, top_ps, keys)]


@runs_kernels
@pytest.mark.parametrize("ties, banned", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("candidates", [8192, 64])  # copied after the first search pass; mostly never
def test_sample_picks_the_references_tokens(ties, banned, candidates, monkeypatch):
    monkeypatch.setattr(kernels.sampling, "CANDIDATES", candidates)
    inputs = filtered_inputs(28, 5000, seed=candidates + 2 * ties + banned, ties=ties, banned=banned)
    got = sample(*inputs)
    assert got.dtype == torch.int64 and got.shape == (28,)
    assert torch.equal(got, sample_ref(*inputs))
    logits, temperatures, top_ks, top_ps, keys = inputs
    z = logits / temperatures.clamp(min=kernels.sampling.MIN_TEMPERATURE)[:, None]
    kept = kept_tokens(z, top_ks, top_ps)
    assert kept.gather(-1, got[:, None]).all()
    # The filters decide: some rows would draw a dropped token without them.
    assert not kept.gather(-1, gumbel_argmax(*inputs[:2], keys)[:, None]).all()


@runs_kernels
@pytest.mark.parametrize("case", ["min_temperature", "max_temperature", "flat", "one_finite", "signed_zeros"])
def test_sample_matches_the_reference_on_edge_rows(case):
    vocab = 3000
    logits = (torch.randn(4, vocab, generator=torch.Generator().manual_seed(9)) * 3).to(DEVICE)
    temperature = {"min_temperature": 1e-7, "max_temperature": FLOAT32_MAX}.get(case, 0.8)
    if case == "flat":  # one tie over the whole row
        logits = torch.zeros_like(logits)
    elif case == "one_finite":  # everything else banned; row 1 keeps a second token
        logits = torch.full_like(logits, float("-inf"))
        logits[:, 17], logits[1, 2000] = 2.0, 1.0
    elif case == "signed_zeros":  # -0 and +0 are one value
        logits = torch.tensor([0.0, -0.0, -1.0, -0.0, 0.0, -2.0], device=DEVICE).repeat(4, vocab // 6)
    top_ks = torch.tensor([1, 50, -1, 3], device=DEVICE)
    top_ps = torch.tensor([1.0, 0.5, 0.9, 1e-30], device=DEVICE)
    inputs = (logits, torch.full((4,), temperature, device=DEVICE), top_ks, top_ps,
              noise_keys(torch.arange(4, device=DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE)))
    assert torch.equal(sample(*inputs), sample_ref(*inputs))


@runs_kernels
def test_sample_is_the_same_in_any_batch():
    logits, temperatures, top_ks, top_ps, keys = filtered_inputs(12, 2500, seed=5)
    batch = sample(logits, temperatures, top_ks, top_ps, keys)
    for i in (0, 3, 7, 11):
        alone = sample(*(x[i:i + 1] for x in (logits, temperatures, top_ks, top_ps, keys)))
        assert alone.item() == batch[i].item()
    # The rows without top-k/top-p are gumbel_argmax's draws.
    plain = ~(((top_ks > 0) & (top_ks < 2500)) | (top_ps < 1))
    assert torch.equal(batch[plain], gumbel_argmax(logits, temperatures, keys)[plain])


def test_sample_rejects_bad_inputs():
    logits, temperatures, top_ks, top_ps, keys = filtered_inputs(3, 50, seed=1)
    with pytest.raises(ValueError, match="top_ks"):
        sample(logits, temperatures, top_ks.int(), top_ps, keys)
    with pytest.raises(ValueError, match="top_ps"):
        sample(logits, temperatures, top_ks, top_ps[:2], keys)
    with pytest.raises(ValueError, match="noise_keys"):
        sample(logits, temperatures, top_ks, top_ps, keys.int())


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 256])
def test_sample_on_cuda_at_the_qwen3_vocabulary(rows, monkeypatch):
    # bf16 logits as the model makes them, then fp32 (as compute_logits hands them over): many ties.
    monkeypatch.setattr(kernels.sampling, "FILTER_KERNEL_ON_GPU", True)  # the kernel, not the reference it waits behind
    vocab = 151936
    logits, temperatures, top_ks, top_ps, keys = filtered_inputs(rows, vocab, seed=rows)
    logits = logits.bfloat16().float()
    top_ks[1::2] = torch.tensor([50, 20, 1000, -1], device=DEVICE).repeat(rows)[:len(top_ks[1::2])]
    top_ps[1::4] = 0.9
    temperatures[0], top_ks[0], top_ps[0] = 0.8, 50, 0.9  # at batch 1 too: both filters
    got = sample(logits, temperatures, top_ks, top_ps, keys)
    assert torch.equal(got, sample_ref(logits, temperatures, top_ks, top_ps, keys))
    assert torch.equal(got, sample_ref(*(x.cpu() for x in (logits, temperatures, top_ks, top_ps, keys))).cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "reference-on-gpu"])
def test_sample_in_graph_replays_a_captured_draw(kernel, monkeypatch):
    monkeypatch.setattr(kernels.sampling, "FILTER_KERNEL_ON_GPU", kernel)
    # The sampler inside a CUDA graph: no host sync to refuse the capture, and a replay on new inputs
    # (copied into the captured tensors) draws what the eager reference draws from them.
    from minivllm.layers.sampler import Sampler
    sampler, rows, vocab = Sampler(), 64, 151936
    logits, temperatures, top_ks, top_ps, _ = filtered_inputs(rows, vocab, seed=3)
    seeds = torch.arange(rows, device=DEVICE)
    steps = torch.zeros(rows, dtype=torch.int64, device=DEVICE)
    static = [logits, temperatures, top_ks, top_ps, seeds, steps]
    sampler.sample_in_graph(*static)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampler.sample_in_graph(*static)
    fresh = filtered_inputs(rows, vocab, seed=4)[:4] + [seeds + 1000, steps + 7]
    for buffer, value in zip(static, fresh):
        buffer.copy_(value)
    graph.replay()
    assert torch.equal(out, sample_ref(*fresh[:4], noise_keys(fresh[4], fresh[5])))
