"""Sampling: filters keep the right tokens, seeded noise is batch-independent and uses the
whole 64-bit seed, the Gumbel-max draw follows softmax(logits / T); penalties and logprobs
against their definitions."""
import pytest
import torch

from minivllm.checks import FLOAT32_MAX
from minivllm.layers.logits_processors import apply_penalties
from minivllm.layers.logprobs import token_logprobs
from kernels.sampling import kept_tokens
from minivllm.layers.sampler import Sampler, sample_seed, uniform_noise


def test_noise_depends_only_on_seed_step_and_token():
    a = uniform_noise(torch.tensor([7, 8]), torch.tensor([3, 3]), 50)
    b = uniform_noise(torch.tensor([1, 7]), torch.tensor([0, 3]), 50)
    torch.testing.assert_close(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert 0 < a.min() and a.max() < 1


def test_greedy_when_temperature_is_zero():
    logits = torch.randn(4, 30)
    out = Sampler()(logits, torch.zeros(4), torch.full((4,), -1), torch.ones(4), torch.arange(4),
                    torch.zeros(4, dtype=torch.long))
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = kept_tokens(logits, torch.tensor([2, -1]), torch.tensor([1.0, 0.6]))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    top_token_only = kept_tokens(logits, torch.tensor([-1, -1]), torch.tensor([0.01, 0.01]))
    assert top_token_only.sum(-1).tolist() == [1, 1]
    # top-p applies to the top-k set renormalised: of 0.5, 0.3 (0.625, 0.375), 0.6 needs only the first.
    assert kept_tokens(logits[:1], torch.tensor([2]), torch.tensor([0.6])).tolist() == [[True, False, False, False]]


def test_thresholds_keep_every_token_tied_with_the_boundary():
    # Thresholds are values: a token tied with the k-th largest, or with the token whose mass reaches
    # p, is kept with it (a sort would keep whichever of the tied tokens it happened to put first).
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert kept_tokens(logits, torch.tensor([2, -1]), torch.ones(2)).tolist() == [
        [True, False, True, True, False], [True, True, True, True, True]]
    # Row 2: e / (e + 4) = 0.40 < 0.5, so the 0s are needed, and all four are kept.
    assert kept_tokens(logits, torch.tensor([-1, -1]), torch.tensor([0.7, 0.5])).tolist() == [
        [True, False, True, True, False], [True, True, True, True, True]]


def test_top_p_compares_exact_integer_masses():
    # Masses are whole units of 2^-32 of the top token's probability, their sum S exact: the top token
    # alone is kept for p up to w_top / S and the next one joins right above it, to float32's last bit.
    logits = torch.tensor([[0.0, -1.0]])
    w = torch.floor(logits[0].double().exp() * 2**32)
    edge = (w[0] / w.sum()).item()
    below = torch.tensor(edge, dtype=torch.float32)
    if below.item() > edge:
        below = below.nextafter(torch.tensor(0.0))
    above = below.nextafter(torch.tensor(1.0))
    assert kept_tokens(logits, torch.tensor([-1]), below[None]).tolist() == [[True, False]]
    assert kept_tokens(logits, torch.tensor([-1]), above[None]).tolist() == [[True, True]]


def test_sampling_frequencies_follow_softmax():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4)
    out = Sampler()(logits, torch.ones(n), torch.full((n,), -1), torch.ones(n), torch.arange(n),
                    torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(out, minlength=4).double() / n
    assert (freq - probs.double()).abs().max() < 0.015  # ~4 standard errors at n = 20000


@pytest.mark.parametrize("top_k, top_p, kept", [(3, 1.0, 3), (-1, 0.75, 3), (4, 0.7, 2), (2, 0.9, 2)])
def test_filtered_sampling_follows_the_renormalised_distribution(top_k, top_p, kept):
    # 0.4, 0.25, 0.15, 0.1, 0.06, 0.04: top-p 0.75 keeps 3 (0.8 reaches it); top-k 4 then p 0.7 of the
    # renormalised 0.44, 0.28, 0.17, 0.11 keeps 2 (0.72); top-k 2 with p 0.9 keeps both.
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 20000
    out = Sampler()(probs.log().expand(n, 6), torch.ones(n), torch.full((n,), top_k), torch.full((n,), top_p),
                    torch.arange(n), torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(out, minlength=6).double() / n
    expected = torch.cat([probs[:kept] / probs[:kept].sum(), torch.zeros(6 - kept)]).double()
    assert (freq[kept:] == 0).all()
    assert (freq - expected).abs().max() < 0.015  # ~4 standard errors at n = 20000


def test_a_seeded_filtered_request_samples_the_same_token_in_any_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 500, generator=gen) * 2
    temperatures = torch.tensor([0.9, 0.0, 1.2, 0.7, 1.0, 0.5])
    top_ks, top_ps = torch.tensor([40, -1, 5, -1, 1, 100]), torch.tensor([0.9, 1.0, 1.0, 0.5, 1.0, 0.95])
    seeds, steps = torch.tensor([11, 12, 13, 14, 15, 16]), torch.tensor([4, 0, 2, 9, 1, 3])
    batch = Sampler()(logits, temperatures, top_ks, top_ps, seeds, steps)
    for i in range(6):
        alone = Sampler()(logits[i:i + 1], temperatures[i:i + 1], top_ks[i:i + 1], top_ps[i:i + 1],
                          seeds[i:i + 1], steps[i:i + 1])
        assert alone.item() == batch[i].item()


def hash32_reference(x: int) -> int:
    """``_hash32`` in Python's unbounded ints, where nothing can overflow or sign-extend."""
    x = (x * 747796405 + 2891336453) % 2**32
    x = ((x >> ((x >> 28) + 4)) ^ x) * 277803737 % 2**32
    return (x >> 22) ^ x


@pytest.mark.parametrize("seed", [5, 5 + 2**32, 2**63 - 1, -2**63, -1, 0x0123456789ABCDEF])
def test_noise_uses_all_64_bits_of_the_seed_exactly(seed):
    step, vocab = 3, 40
    noise = uniform_noise(torch.tensor([seed]), torch.tensor([step]), vocab)[0]
    bits = seed % 2**64
    row = hash32_reference(hash32_reference(hash32_reference(bits % 2**32) ^ (bits >> 32)) ^ step)
    expected = [(hash32_reference(row ^ hash32_reference(t)) + 0.5) / 2**32 for t in range(vocab)]
    assert noise.tolist() == expected


def test_seeds_that_differ_above_bit_32_sample_differently():
    logits = torch.zeros(1, 1000)
    draws = [Sampler()(logits, torch.ones(1), torch.full((1,), -1), torch.ones(1), torch.tensor([seed]),
                       torch.tensor([0])).item() for seed in (5, 5 + 2**32, 5 + 2**62)]
    assert len(set(draws)) == 3


def test_sample_seeds_follow_splitmix64():
    # The published SplitMix64 outputs for this seed (Vigna's splitmix64.c, as in rand_xoshiro's tests).
    seed, published = 1477776061723855037, [1985237415132408290, 2979275885539914483, 13511426838097143398,
                                            8488337342461049707, 15141737807933549159]
    assert sample_seed(seed, 0) == seed
    assert [sample_seed(seed, i) % 2**64 for i in range(1, 6)] == published
    # Seeds are taken modulo 2^64 and handed over as signed int64.
    assert sample_seed(-1, 0) == sample_seed(2**64 - 1, 0) == -1
    assert all(-2**63 <= sample_seed(2**64 - 1, i) < 2**63 for i in range(8))


def test_a_tiny_top_p_keeps_the_top_token():
    """top_p=1e-50 is 0 in float32: the filter must still keep the likeliest token."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    top_p = torch.full((64,), 1e-50, dtype=torch.float32)
    assert top_p.max() == 0
    out = Sampler()(logits, torch.ones(64), torch.full((64,), -1), top_p, torch.arange(64),
                    torch.zeros(64, dtype=torch.long))
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e30, FLOAT32_MAX])
def test_top_k_1_is_greedy_at_the_largest_temperatures(temperature):
    """The largest temperature SamplingParams takes still leaves the logits apart in float32."""
    logits = 3 * torch.randn(32, 50, generator=torch.Generator().manual_seed(2))
    out = Sampler()(logits, torch.full((32,), temperature), torch.ones(32, dtype=torch.long), torch.ones(32),
                    torch.arange(32), torch.zeros(32, dtype=torch.long))
    assert torch.equal(out, logits.argmax(-1))


def test_penalties_match_their_definition_in_float64():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 12, generator=gen)
    prompts, outputs = [[1, 2, 2], [5], []], [[2, 3, 3, 3], [], [7, 7, 11]]
    rep, pres, freq = [1.5, 0.8, 1.0], [0.3, 1.0, -0.5], [0.2, 0.0, 1.2]
    got = apply_penalties(logits.clone(), prompts, outputs, rep, pres, freq)
    expected = logits.double().clone()
    for r in range(3):
        for t in set(prompts[r]) | set(outputs[r]):
            x = expected[r, t]
            expected[r, t] = x / rep[r] if x > 0 else x * rep[r]
        for t in set(outputs[r]):
            expected[r, t] -= pres[r] + freq[r] * outputs[r].count(t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_token_logprobs_ranks_and_top_k():
    logits = torch.tensor([[2.0, 2.0, 0.0, -1.0], [0.0, 1.0, 3.0, 2.0]])
    entries = token_logprobs(logits, [1, 0], [2, 1])
    ref = logits.double().log_softmax(-1)
    (ids0, lps0, rank0), (ids1, lps1, rank1) = entries
    assert ids0[0] == 1 and sorted(ids0[1:]) == [0, 1] and rank0 == 2  # a tie ranks last, as in vLLM
    assert ids1 == [0, 2] and rank1 == 4
    torch.testing.assert_close(torch.tensor(lps1, dtype=torch.float64), ref[1, [0, 2]])
    torch.testing.assert_close(torch.tensor(lps0[:1], dtype=torch.float64), ref[0, [1]])


@pytest.mark.gpu
def test_noise_is_the_same_on_cpu_and_gpu():
    seeds = torch.tensor([5, 5 + 2**32, -1, 2**63 - 1, -2**63])
    steps = torch.tensor([0, 1, 2, 3, 2**31])
    assert torch.equal(uniform_noise(seeds, steps, 5000), uniform_noise(seeds.cuda(), steps.cuda(), 5000).cpu())
