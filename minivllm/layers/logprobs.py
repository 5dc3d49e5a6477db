"""Log-probabilities of chosen tokens and of the top k, from a step's raw logits."""
import torch

from minivllm.outputs import TokenLogprobs


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top_k: list[int]) -> list[TokenLogprobs]:
    """For each row of ``logits`` ``[R, V]``: ``token_ids[r]``'s logprob and rank, then the
    ``top_k[r]`` likeliest tokens'. The rank counts the tokens at least as likely (vLLM's: 1 for
    the likeliest, ties ranked last)."""
    logprobs = logits.float().log_softmax(-1)
    chosen = torch.tensor(token_ids, dtype=torch.int64).to(logits.device)[:, None]
    chosen_logprobs = logprobs.gather(1, chosen)
    ranks = (logprobs >= chosen_logprobs).sum(-1).tolist()
    top_logprobs, top_ids = logprobs.topk(max(top_k), -1)
    top_logprobs, top_ids, chosen_logprobs = top_logprobs.tolist(), top_ids.tolist(), chosen_logprobs[:, 0].tolist()
    return [([t] + ids[:k], [lp] + lps[:k], rank)
            for t, lp, rank, ids, lps, k in zip(token_ids, chosen_logprobs, ranks, top_ids, top_logprobs, top_k)]
