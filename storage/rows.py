"""Rows as flat numpy buffers with offsets, and their conversion to and from Arrow record batches.

A `RowBatch` holds R rows with T tokens in all. Nothing here loops over tokens in Python: Arrow list columns are
(offsets, values) pairs, and so are these arrays, so conversion is a matter of wrapping buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from storage.format import CacheFormatError, CacheHeader


@dataclass
class RowBatch:
    """R rows of a cache, flattened.

    Attributes:
        seq_id: (R,) uint64, stable ids derived from the source row and chunk.
        offsets: (R+1,) int64, row r spans tokens offsets[r]:offsets[r+1].
        input_ids: (T,) int32.
        prompt_len: (R,) int32.
        loss_mask: (T,) uint8 or None.
        topk_ids: (T, k) uint16/uint32, topk mode; topk_logprobs: (T, k) float16, sorted descending.
        sample_offsets: (T+1,) int64, position t's draws span sample_offsets[t]:sample_offsets[t+1] (sample mode).
        sample_ids: (S,) uint16/uint32 unique ids; sample_counts: (S,) uint8 how often each was drawn.
        text: list of R strings or None.
    """

    seq_id: np.ndarray
    offsets: np.ndarray
    input_ids: np.ndarray
    prompt_len: np.ndarray
    loss_mask: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    sample_offsets: np.ndarray | None = None
    sample_ids: np.ndarray | None = None
    sample_counts: np.ndarray | None = None
    text: list[str] | None = None

    @property
    def num_rows(self) -> int:
        return len(self.seq_id)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, r: int) -> dict:
        """One row as a dict of numpy arrays (for inspection, not for the hot path)."""
        s, e = int(self.offsets[r]), int(self.offsets[r + 1])
        out = {"seq_id": int(self.seq_id[r]), "input_ids": self.input_ids[s:e], "prompt_len": int(self.prompt_len[r])}
        if self.loss_mask is not None:
            out["loss_mask"] = self.loss_mask[s:e]
        if self.topk_ids is not None:
            out["topk_ids"], out["topk_logprobs"] = self.topk_ids[s:e], self.topk_logprobs[s:e]
        if self.sample_ids is not None:
            so = self.sample_offsets[s : e + 1]
            out["sample_ids"] = [self.sample_ids[a:b] for a, b in zip(so[:-1], so[1:])]
            out["sample_counts"] = [self.sample_counts[a:b] for a, b in zip(so[:-1], so[1:])]
        if self.text is not None:
            out["text"] = self.text[r]
        return out


def _list(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), values)


def to_record_batch(rows: RowBatch, header: CacheHeader) -> pa.RecordBatch:
    """Wrap a RowBatch's buffers as an Arrow record batch of the header's schema.

    Raises:
        CacheFormatError: when the arrays disagree with each other or with the header.
    """
    schema = header.schema()
    offsets = np.asarray(rows.offsets, dtype=np.int64) - int(rows.offsets[0])
    T = int(offsets[-1])
    if offsets[-1] >= 2**31:
        raise CacheFormatError(f"a record batch holds {T} tokens, over Arrow's 2^31 list limit; write smaller batches")
    if len(rows.input_ids) != T or len(rows.seq_id) != len(offsets) - 1 or len(rows.prompt_len) != len(rows.seq_id):
        raise CacheFormatError("row arrays disagree: seq_id, prompt_len, offsets and input_ids must describe the same rows")
    cols = [
        pa.array(np.asarray(rows.seq_id, dtype=np.uint64)),
        _list(offsets, pa.array(np.asarray(rows.input_ids, dtype=np.int32))),
        pa.array(np.asarray(rows.prompt_len, dtype=np.int32)),
    ]
    if header.loss_mask:
        if rows.loss_mask is None or len(rows.loss_mask) != T:
            raise CacheFormatError("this cache stores loss_mask: give one uint8 per token")
        cols.append(_list(offsets, pa.array(np.asarray(rows.loss_mask, dtype=np.uint8))))
    id_dtype = header.id_dtype
    if header.mode == "topk":
        ids, lps = rows.topk_ids, rows.topk_logprobs
        if ids is None or lps is None or ids.shape != (T, header.k) or lps.shape != (T, header.k):
            raise CacheFormatError(f"top-k arrays must have shape ({T}, {header.k}), one row of k per token")
        flat_ids = pa.array(np.ascontiguousarray(ids, dtype=id_dtype).reshape(-1))
        flat_lps = pa.array(np.ascontiguousarray(lps, dtype=np.float16).reshape(-1))
        cols.append(_list(offsets, pa.FixedSizeListArray.from_arrays(flat_ids, header.k)))
        cols.append(_list(offsets, pa.FixedSizeListArray.from_arrays(flat_lps, header.k)))
    else:
        so = rows.sample_offsets
        if so is None or len(so) != T + 1 or rows.sample_ids is None or rows.sample_counts is None:
            raise CacheFormatError(f"sample arrays need sample_offsets of length {T + 1} and ids/counts")
        so = np.asarray(so, dtype=np.int64) - int(so[0])
        inner_ids = _list(so, pa.array(np.asarray(rows.sample_ids, dtype=id_dtype)))
        inner_counts = _list(so, pa.array(np.asarray(rows.sample_counts, dtype=np.uint8)))
        cols.append(_list(offsets, inner_ids))
        cols.append(_list(offsets, inner_counts))
    if header.text:
        if rows.text is None or len(rows.text) != len(rows.seq_id):
            raise CacheFormatError("this cache stores text: give one string per row")
        cols.append(pa.array(rows.text, type=pa.large_string()))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _np(arr: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a primitive Arrow array without nulls."""
    return arr.to_numpy(zero_copy_only=True)


def _flat(list_arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets relative to the values' start, values) of a list array, honouring slices."""
    offsets = _np(list_arr.offsets).astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    return offsets - start, list_arr.values.slice(start, end - start)


def from_arrow(batch: pa.RecordBatch | pa.Table, header: CacheHeader) -> RowBatch:
    """Flat numpy views of one record batch (or a one-chunk table) of a cache shard."""
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], batch.schema)
    col = batch.column
    offsets, ids = _flat(col("input_ids"))
    out = RowBatch(
        seq_id=_np(col("seq_id")),
        offsets=offsets,
        input_ids=_np(ids),
        prompt_len=_np(col("prompt_len")),
    )
    if header.loss_mask:
        out.loss_mask = _np(_flat(col("loss_mask"))[1])
    if header.mode == "topk":
        k = header.k
        out.topk_ids = _np(_flat(col("topk_ids"))[1].flatten()).reshape(-1, k)
        out.topk_logprobs = _np(_flat(col("topk_logprobs"))[1].flatten()).reshape(-1, k)
    else:
        _, inner_ids = _flat(col("sample_ids"))
        out.sample_offsets, ids_vals = _flat(inner_ids)
        out.sample_ids = _np(ids_vals)
        out.sample_counts = _np(_flat(_flat(col("sample_counts"))[1])[1])
    if header.text:
        out.text = col("text").to_pylist()
    return out


def gather_ranges(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the elements of the chosen rows, in the given order, and their new offsets.

    Args:
        offsets: (R+1,) offsets of all rows.
        rows: (B,) row indices, any order, repeats allowed.
    Returns:
        (index, new_offsets): (sum of lengths,) int64 element indices and (B+1,) int64 offsets.
    """
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # element i of output row b sits at starts[b] + (i - new_offsets[b]); built with repeat, no Python loop.
    index = np.arange(new_offsets[-1], dtype=np.int64) + np.repeat(starts - new_offsets[:-1], lengths)
    return index, new_offsets


def take_rows(batch: RowBatch, rows: np.ndarray) -> RowBatch:
    """The chosen rows of a RowBatch (copies), in the given order."""
    rows = np.asarray(rows, dtype=np.int64)
    tok, offsets = gather_ranges(batch.offsets, rows)
    out = RowBatch(
        seq_id=batch.seq_id[rows],
        offsets=offsets,
        input_ids=batch.input_ids[tok],
        prompt_len=batch.prompt_len[rows],
        loss_mask=None if batch.loss_mask is None else batch.loss_mask[tok],
        text=None if batch.text is None else [batch.text[r] for r in rows],
    )
    if batch.topk_ids is not None:
        out.topk_ids, out.topk_logprobs = batch.topk_ids[tok], batch.topk_logprobs[tok]
    if batch.sample_ids is not None:
        draw, out.sample_offsets = gather_ranges(batch.sample_offsets, tok)
        out.sample_ids, out.sample_counts = batch.sample_ids[draw], batch.sample_counts[draw]
    return out


def concat_rows(parts: list[RowBatch]) -> RowBatch:
    """Concatenate RowBatches of one cache layout."""
    if len(parts) == 1:
        return parts[0]

    def cat_offsets(offs: list[np.ndarray]) -> np.ndarray:
        shifts = np.cumsum([0] + [int(o[-1]) for o in offs[:-1]])
        return np.concatenate([offs[0][:1]] + [o[1:] + s for o, s in zip(offs, shifts)])

    def cat(name: str):
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else np.concatenate(vals)

    out = RowBatch(
        seq_id=cat("seq_id"),
        offsets=cat_offsets([p.offsets - p.offsets[0] for p in parts]),
        input_ids=cat("input_ids"),
        prompt_len=cat("prompt_len"),
        loss_mask=cat("loss_mask"),
        topk_ids=cat("topk_ids"),
        topk_logprobs=cat("topk_logprobs"),
        sample_ids=cat("sample_ids"),
        sample_counts=cat("sample_counts"),
        text=None if parts[0].text is None else [t for p in parts for t in p.text],
    )
    if parts[0].sample_offsets is not None:
        out.sample_offsets = cat_offsets([p.sample_offsets - p.sample_offsets[0] for p in parts])
    return out
