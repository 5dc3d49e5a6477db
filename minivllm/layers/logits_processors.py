"""The logit changes a request can ask for before sampling: repetition, presence and frequency
penalties, and tokens it may not generate yet (EOS and its stop tokens before ``min_tokens``).
They run on the rows of the requests that ask, after the forward (and its CUDA graph)."""
import torch


def token_counts(ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """``[R, V]``: how often each token occurs in each row's ``ids``."""
    width = max(map(len, ids), default=0)
    padded = torch.tensor([row + [vocab_size] * (width - len(row)) for row in ids], dtype=torch.int64)
    counts = torch.zeros(len(ids), vocab_size + 1, device=device)  # column V takes the padding
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits, prompt_ids: list[list[int]], output_ids: list[list[int]], repetition: list[float],
                    presence: list[float], frequency: list[float]) -> torch.Tensor:
    """Penalized ``logits`` ``[R, V]``, vLLM's definitions: a token seen in the prompt or the
    output has its logit divided by the repetition penalty if positive, multiplied if not (HF's
    RepetitionPenaltyLogitsProcessor); then ``frequency * count + presence * (count > 0)`` over
    the output is subtracted (OpenAI's)."""
    vocab, device = logits.shape[-1], logits.device

    def column(values):
        return torch.tensor(values, dtype=logits.dtype).to(device)[:, None]

    output_counts = token_counts(output_ids, vocab, device)
    seen = (token_counts(prompt_ids, vocab, device) > 0) | (output_counts > 0)
    rep = column(repetition)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - column(frequency) * output_counts - column(presence) * (output_counts > 0)


def ban_tokens(logits, rows: list[int], token_ids: list[list[int]]):
    """Makes ``token_ids[i]`` impossible in row ``rows[i]`` of ``logits`` (in place)."""
    flat_rows = [r for r, ids in zip(rows, token_ids) for _ in ids]
    flat_ids = [t for ids in token_ids for t in ids]
    logits[flat_rows, flat_ids] = float("-inf")
