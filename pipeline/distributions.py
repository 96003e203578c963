"""Sparse teacher distributions from logits: pure functions, shapes written down.

Both work on a chunk of positions at a time, so that the fp32 (positions, vocab) buffer stays bounded whatever the
vocabulary: the caller never holds (batch, length, vocab) in fp32.
"""

from __future__ import annotations

import torch


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities at temperature 1 and their ids.

    Args:
        logits: (N, V) float32.
    Returns:
        (values, ids): (N, k) float32 log-probs sorted descending, (N, k) int64 token ids.
    """
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1)
    values, ids = torch.topk(logits, k, dim=-1, sorted=True)  # (N, k)
    return values - log_z, ids


def sample_unique(logits: torch.Tensor, draws: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """N draws with replacement from softmax(logits) per position, as unique ids with counts.

    Random-sampling KD (Anshumann et al., ACL 2025, "Sparse Logit Sampling"): counts / N is an unbiased estimate of
    the teacher's distribution.

    Args:
        logits: (N, V) float32.
        draws: draws per position.
        generator: the source of randomness (seeded per work unit by the caller).
    Returns:
        (n_unique, ids, counts): (N,) int64 unique ids per position; (S,) int64 ids, ascending within each
        position; (S,) int64 counts, summing to `draws` at every position. S = n_unique.sum().
    """
    probs = torch.softmax(logits, dim=-1)  # (N, V)
    picked = torch.multinomial(probs, draws, replacement=True, generator=generator)  # (N, draws)
    picked, _ = torch.sort(picked, dim=-1)
    is_new = torch.ones_like(picked, dtype=torch.bool)
    is_new[:, 1:] = picked[:, 1:] != picked[:, :-1]
    ids = picked[is_new]  # (S,) row-major: position by position, ascending
    starts = torch.nonzero(is_new.reshape(-1)).squeeze(1)  # (S,) flat index where each run starts
    ends = torch.cat([starts[1:], starts.new_tensor([picked.numel()])])
    return is_new.sum(dim=1), ids, ends - starts


def positions_per_chunk(vocab_size: int, budget_bytes: int) -> int:
    """Positions per chunk so that the fp32 (chunk, vocab) logits and the temporaries of log-softmax, top-k or
    softmax (about three such buffers at once) stay within budget_bytes."""
    return max(1, budget_bytes // (vocab_size * 4 * 3))
