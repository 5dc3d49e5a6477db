"""Sampling: filters keep the right tokens, seeded noise is batch-independent, and the
Gumbel-max draw follows softmax(logits / T)."""
import torch

from minivllm.layers.sampler import Sampler, _filter_top_k_top_p, uniform_noise


def test_noise_depends_only_on_seed_step_and_token():
    a = uniform_noise(torch.tensor([7, 8]), torch.tensor([3, 3]), 50)
    b = uniform_noise(torch.tensor([1, 7]), torch.tensor([0, 3]), 50)
    torch.testing.assert_close(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert 0 < a.min() and a.max() < 1


def test_greedy_when_temperature_is_zero():
    logits = torch.randn(4, 30)
    out = Sampler()(logits, torch.zeros(4), torch.full((4,), -1), torch.ones(4), torch.arange(4), torch.zeros(4, dtype=torch.long))
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = _filter_top_k_top_p(logits, torch.tensor([2, -1]), torch.tensor([1.0, 0.6])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    top_token_only = _filter_top_k_top_p(logits, torch.tensor([-1, -1]), torch.tensor([0.01, 0.01])).isfinite()
    assert top_token_only.sum(-1).tolist() == [1, 1]


def test_sampling_frequencies_follow_softmax():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4)
    out = Sampler()(logits, torch.ones(n), torch.full((n,), -1), torch.ones(n), torch.arange(n),
                    torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(out, minlength=4).double() / n
    assert (freq - probs.double()).abs().max() < 0.015  # ~4 standard errors at n = 20000
