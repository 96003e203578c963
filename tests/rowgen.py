"""Random cache rows for the storage tests: valid by construction, any shape, either mode."""

from __future__ import annotations

import numpy as np

from storage.format import CacheHeader
from storage.rows import RowBatch


def random_rows(header: CacheHeader, lengths: list[int], seed: int = 0, first_seq_id: int = 0) -> RowBatch:
    """Rows of the given lengths that satisfy every invariant `verify` checks."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    T, V = int(offsets[-1]), header.vocab_size
    rows = RowBatch(
        seq_id=np.arange(first_seq_id, first_seq_id + len(lengths), dtype=np.uint64),
        offsets=offsets,
        input_ids=rng.integers(0, V, T, dtype=np.int64).astype(np.int32),
        prompt_len=np.minimum(rng.integers(0, 4, len(lengths)), lengths).astype(np.int32),
    )
    if header.loss_mask:
        rows.loss_mask = rng.integers(0, 2, T).astype(np.uint8)
    if header.mode == "topk":
        k = header.k
        # k distinct ids per position (highest ids included, to exercise the id width)
        ids = np.stack([rng.choice(V, size=k, replace=False) for _ in range(T)]) if T else np.zeros((0, k))
        if T:
            ids[:, 0] = V - 1
        logits = rng.normal(size=(T, k)) * 3
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True) + rng.uniform(0, 2, (T, 1)))
        rows.topk_ids = ids.astype(header.id_dtype)
        rows.topk_logprobs = -np.sort(-lp, axis=1).astype(np.float16)
    else:
        n = header.draws
        ids_list, counts_list, so = [], [], [0]
        for _ in range(T):
            draws = rng.choice(np.array([0, 1, 2, V - 1]), size=n) if V > 3 else rng.integers(0, V, n)
            u, c = np.unique(draws, return_counts=True)
            ids_list.append(u)
            counts_list.append(c)
            so.append(so[-1] + len(u))
        rows.sample_offsets = np.array(so, dtype=np.int64)
        rows.sample_ids = (np.concatenate(ids_list) if T else np.zeros(0)).astype(header.id_dtype)
        rows.sample_counts = (np.concatenate(counts_list) if T else np.zeros(0)).astype(np.uint8)
    if header.text:
        rows.text = [f"row {i}" for i in range(len(lengths))]
    return rows
