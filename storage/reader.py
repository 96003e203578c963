"""The cache reader: the writer's mirror image. Memory-mapped, zero-copy, several caches read as one.

Rows are addressed by a global index over all shards (and all caches, in the order given). Reading a batch of rows
copies only the chosen rows' slices out of the memory map, with numpy fancy indexing and no Python loop over tokens.
Order is a pure function of (seed, epoch); `split_order` hands every rank and DataLoader worker a disjoint share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from storage.format import (
    MANIFEST,
    CacheFormatError,
    CacheHeader,
    CacheMismatchError,
    check_format_version,
    read_json,
)
from storage.rows import RowBatch, concat_rows, from_arrow, take_rows
from storage.writer import file_sha256


def load_manifest(path: str) -> dict[str, Any]:
    """The manifest of a complete cache.

    Raises:
        CacheFormatError: no cache there, an incomplete one, or a format version this kdcache does not read.
    """
    if not os.path.isdir(path):
        raise CacheFormatError(f"cache {path} does not exist (expected a directory with {MANIFEST})")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        if os.path.exists(os.path.join(path, "header.json")):
            raise CacheFormatError(
                f"cache {path} is incomplete (no {MANIFEST}): its capture did not finish; rerun the same command to resume"
            )
        raise CacheFormatError(f"{path} is not a kdcache cache: {MANIFEST} is missing")
    manifest = read_json(mpath, "manifest")
    check_format_version(manifest, where=f"cache {path}")
    if manifest.get("status") != "complete":
        raise CacheFormatError(
            f"cache {path} is incomplete (status {manifest.get('status')!r}); rerun the same command to resume"
        )
    return manifest


def same_schema(a: pa.Schema, b: pa.Schema) -> bool:
    """Field names and types equal, and the kdcache metadata that defines the layout equal."""
    keys = ("kdcache.format_version", "kdcache.mode", "kdcache.k", "kdcache.draws", "kdcache.vocab_size")
    ma, mb = a.metadata or {}, b.metadata or {}
    return a.remove_metadata().equals(b.remove_metadata()) and all(
        ma.get(k.encode()) == mb.get(k.encode()) for k in keys
    )


@dataclass
class _Block:
    """One record batch of one shard: the unit of zero-copy access."""

    cache: int
    shard: int
    batch: int
    start: int  # global index of its first row
    rows: int


class CacheReader:
    """Reads one or several complete caches as one sequence of rows.

    Args:
        paths: a cache directory or a list of them (all with the same mode, k or N, and vocabulary).
        check: "size" (default) compares every shard's size and schema with the manifest at open;
            "hash" also re-hashes every shard (slow on big caches; `kdcache verify` does it once).
        allow_mixed_teachers: read caches of different teachers together.

    Raises:
        CacheFormatError: a missing, incomplete, truncated or altered cache.
        CacheMismatchError: caches that cannot be read together.
    """

    def __init__(self, paths: str | list[str], check: str = "size", allow_mixed_teachers: bool = False):
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not self.paths:
            raise CacheFormatError("no cache given")
        self.manifests = [load_manifest(p) for p in self.paths]
        self.headers = [CacheHeader.from_dict(m) for m in self.manifests]
        self.header = self._common_header(allow_mixed_teachers)
        self._files: dict[tuple[int, int], pa.ipc.RecordBatchFileReader] = {}
        self._views: dict[int, RowBatch] = {}
        self.blocks: list[_Block] = []
        self.cache_rows: list[tuple[int, int]] = []  # [start, end) of each cache in the global index
        start = 0
        for c, (path, manifest) in enumerate(zip(self.paths, self.manifests)):
            cache_start = start
            for s, shard in enumerate(manifest["shards"]):
                reader = self._open_shard(c, s, path, shard, check)
                for b in range(reader.num_record_batches):
                    n = reader.get_batch(b).num_rows
                    self.blocks.append(_Block(c, s, b, start, n))
                    start += n
            if start - cache_start != manifest["totals"]["rows"]:
                raise CacheFormatError(
                    f"cache {path}: shards hold {start - cache_start} rows, the manifest says "
                    f"{manifest['totals']['rows']}; the cache is damaged, recapture it"
                )
            self.cache_rows.append((cache_start, start))
        self.num_rows = start
        self.num_tokens = sum(m["totals"]["tokens"] for m in self.manifests)
        self._block_starts = np.array([b.start for b in self.blocks], dtype=np.int64)

    def _common_header(self, allow_mixed_teachers: bool) -> CacheHeader:
        first = self.headers[0]
        for path, h in zip(self.paths[1:], self.headers[1:]):
            diffs = [
                f"{name} {getattr(first, name)!r} vs {getattr(h, name)!r}"
                for name in ("mode", "k", "draws", "vocab_size")
                if getattr(first, name) != getattr(h, name)
            ]
            if first.tokenizer.get("fingerprint") != h.tokenizer.get("fingerprint"):
                diffs.append("tokenizer fingerprint")
            if diffs:
                raise CacheMismatchError(
                    f"caches {self.paths[0]} and {path} cannot be read together: {', '.join(diffs)} differ"
                )
            if first.teacher.get("id") != h.teacher.get("id") and not allow_mixed_teachers:
                raise CacheMismatchError(
                    f"caches {self.paths[0]} and {path} come from different teachers "
                    f"({first.teacher.get('id')} vs {h.teacher.get('id')}); pass --allow-mixed-teachers to mix them"
                )
        # A set of caches has a loss mask if any member has one (the others' masks follow from prompt_len).
        return CacheHeader(
            mode=first.mode,
            vocab_size=first.vocab_size,
            k=first.k,
            draws=first.draws,
            loss_mask=any(h.loss_mask for h in self.headers),
            text=all(h.text for h in self.headers),
            teacher=first.teacher,
            tokenizer=first.tokenizer,
            dataset=first.dataset,
            config=first.config,
        )

    def _open_shard(self, c: int, s: int, path: str, shard: dict, check: str) -> pa.ipc.RecordBatchFileReader:
        fpath = os.path.join(path, shard["path"])
        if not os.path.exists(fpath):
            raise CacheFormatError(f"cache {path}: shard {shard['path']} is missing; the cache is damaged, recapture it")
        size = os.path.getsize(fpath)
        if size != shard["bytes"]:
            raise CacheFormatError(
                f"cache {path}: shard {shard['path']} has {size} bytes, the manifest says {shard['bytes']} "
                "(truncated or replaced); recapture it"
            )
        if check == "hash" and file_sha256(fpath) != shard["sha256"]:
            raise CacheFormatError(f"cache {path}: shard {shard['path']} fails its sha256 check (corrupt); recapture it")
        try:
            reader = pa.ipc.open_file(pa.memory_map(fpath, "r"))
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheFormatError(f"cache {path}: shard {shard['path']} is not a readable Arrow file ({e})") from None
        if not same_schema(reader.schema, self.headers[c].schema()):
            raise CacheFormatError(
                f"cache {path}: shard {shard['path']} has a schema different from the manifest's; recapture it"
            )
        self._files[(c, s)] = reader
        return reader

    def _view(self, i: int) -> RowBatch:
        """Zero-copy numpy views of block i (cached; the memory map stays open)."""
        view = self._views.get(i)
        if view is None:
            b = self.blocks[i]
            view = from_arrow(self._files[(b.cache, b.shard)].get_batch(b.batch), self.headers[b.cache])
            self._views[i] = view
        return view

    def __len__(self) -> int:
        return self.num_rows

    def read_rows(self, indices: np.ndarray) -> RowBatch:
        """Rows at global indices, copied out of the memory map, in the order given.

        Sorted indices are cheapest (no reordering copy); a training batch's order inside the batch does not matter.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row index out of range [0, {self.num_rows})")
        block = np.searchsorted(self._block_starts, indices, side="right") - 1
        order = np.argsort(block, kind="stable")
        grouped = block[order]
        parts = []
        bounds = np.flatnonzero(np.diff(grouped)) + 1
        for seg in np.split(np.arange(len(order)), bounds):
            if len(seg) == 0:
                continue
            b = int(grouped[seg[0]])
            local = indices[order[seg]] - self.blocks[b].start
            parts.append(self._fill_missing(take_rows(self._view(b), local), self.blocks[b].cache))
        if not parts:
            return self._fill_missing(take_rows(self._view(0), np.zeros(0, dtype=np.int64)), 0)
        out = concat_rows(parts)
        if np.any(order != np.arange(len(order))):
            out = take_rows(out, np.argsort(order, kind="stable"))
        return out

    def read_padded(self, indices: np.ndarray, pad_id: int = 0, pad_to_multiple: int = 1) -> dict[str, np.ndarray]:
        """Rows at global indices, padded for a causal LM and a sparse loss, in one copy out of the memory map.

        Each row's tokens are contiguous in the shard and in the output, so a row is a handful of slice copies:
        the loop is over rows, never over tokens.

        Returns (B rows, L = longest row rounded up to pad_to_multiple):
            input_ids (B, L) int64, padded with pad_id; attention_mask (B, L) int64;
            target_mask (B, L) bool: position t is trained on, i.e. its next token t+1 is a target (its
                ground truth is input_ids[:, t + 1]);
            top-k mode: topk_ids (B, L, k) uint16/uint32 (0 where padded), topk_logprobs (B, L, k) float16
                (-inf where padded);
            sample mode: sample_n (B, L) uint8, how many ids are stored at each position (0 where padded), and
                flat over the S stored ids in (row, position) order: sample_ids (S,) uint16/uint32 and
                sample_counts (S,) uint8. Positions are expanded on the device (repeat_interleave of sample_n),
                since shipping an int64 position per id would cost more bytes than the ids themselves.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row index out of range [0, {self.num_rows})")
        blocks = np.searchsorted(self._block_starts, indices, side="right") - 1
        local = indices - self._block_starts[blocks]
        views = [self._view(int(b)) for b in blocks]
        starts = np.array([v.offsets[i] for v, i in zip(views, local)], dtype=np.int64)
        ends = np.array([v.offsets[i + 1] for v, i in zip(views, local)], dtype=np.int64)
        lengths = ends - starts
        B = len(indices)
        L = max(int(lengths.max()) if B else 1, 1)
        L = -(-L // pad_to_multiple) * pad_to_multiple
        h = self.header
        input_ids = np.full((B, L), pad_id, dtype=np.int32)
        prompt_len = np.array([v.prompt_len[i] for v, i in zip(views, local)], dtype=np.int64)
        cols = np.arange(L)[None, :]
        attention = cols < lengths[:, None]
        # A token is a target where the row's loss mask says so (chat), else when it lies after the prompt.
        if h.loss_mask:
            is_target = np.zeros((B, L), dtype=bool)
        else:
            is_target = attention & (cols >= prompt_len[:, None])
        if h.mode == "topk":
            topk_ids = np.empty((B, L, h.k), dtype=h.id_dtype)
            topk_lps = np.empty((B, L, h.k), dtype=np.float16)
        else:
            draw_starts = np.array([v.sample_offsets[s] for v, s in zip(views, starts)], dtype=np.int64)
            draw_ends = np.array([v.sample_offsets[e] for v, e in zip(views, ends)], dtype=np.int64)
            S = int((draw_ends - draw_starts).sum())
            draws_per_pos = np.zeros((B, L), dtype=np.uint8)  # at most N <= 255 unique ids per position
            sample_ids = np.empty(S, dtype=h.id_dtype)
            sample_counts = np.empty(S, dtype=np.uint8)
            cursor = 0
        for b, v in enumerate(views):
            s, e, n = int(starts[b]), int(ends[b]), int(lengths[b])
            input_ids[b, :n] = v.input_ids[s:e]
            if h.loss_mask:
                if v.loss_mask is not None:
                    is_target[b, :n] = v.loss_mask[s:e]
                else:
                    is_target[b, prompt_len[b] : n] = True
            if h.mode == "topk":
                topk_ids[b, :n] = v.topk_ids[s:e]
                topk_ids[b, n:] = 0
                topk_lps[b, :n] = v.topk_logprobs[s:e]
                topk_lps[b, n:] = -np.inf
            else:
                a, z = int(draw_starts[b]), int(draw_ends[b])
                sample_ids[cursor : cursor + z - a] = v.sample_ids[a:z]
                sample_counts[cursor : cursor + z - a] = v.sample_counts[a:z]
                draws_per_pos[b, :n] = _draws_per_position(v)[s:e]
                cursor += z - a
        target_mask = np.zeros((B, L), dtype=bool)
        target_mask[:, :-1] = is_target[:, 1:]
        out = {"input_ids": input_ids, "attention_mask": attention, "target_mask": target_mask}
        if h.mode == "topk":
            out.update(topk_ids=topk_ids, topk_logprobs=topk_lps)
        else:
            out.update(sample_n=draws_per_pos, sample_ids=sample_ids, sample_counts=sample_counts)
        return out

    def _fill_missing(self, rows: RowBatch, cache: int) -> RowBatch:
        """Bring rows of one member cache to the set's layout (implied loss masks, dropped text)."""
        if self.header.loss_mask and rows.loss_mask is None:
            pos = np.arange(rows.num_tokens) - np.repeat(rows.offsets[:-1], rows.lengths)
            rows.loss_mask = (pos >= np.repeat(rows.prompt_len, rows.lengths)).astype(np.uint8)
        if not self.header.text:
            rows.text = None
        return rows

    def iter_shard_rows(self) -> Iterator[tuple[int, int, RowBatch]]:
        """(cache index, shard index, rows) for every record batch, zero-copy, in storage order."""
        for i, b in enumerate(self.blocks):
            yield b.cache, b.shard, self._view(i)


def _draws_per_position(view: RowBatch) -> np.ndarray:
    """(T,) number of stored ids at each position of a block, computed once per block and kept."""
    if not hasattr(view, "_draws_per_pos"):
        view._draws_per_pos = np.diff(view.sample_offsets).astype(np.uint8)
    return view._draws_per_pos


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global row order of one epoch: a pure function of (num_rows, seed, epoch)."""
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_rows).astype(np.int64)


def split_order(order: np.ndarray, rank: int = 0, world: int = 1, worker: int = 0, workers: int = 1) -> np.ndarray:
    """This (rank, worker)'s share of an epoch order: every row goes to exactly one share, none twice.

    Shares differ in length by at most one row; callers that need equal steps per rank drop the remainder.
    """
    if not (0 <= rank < world and 0 <= worker < workers):
        raise ValueError(f"rank {rank}/{world}, worker {worker}/{workers} out of range")
    return order[rank * workers + worker :: world * workers]


@dataclass(frozen=True)
class ReadPosition:
    """Where a reader stands, enough to resume exactly: the epoch's order is rebuilt from (seed, epoch)."""

    seed: int
    epoch: int
    rows_seen: int  # rows of this epoch's share already consumed


def iter_batches(
    reader: CacheReader,
    batch_rows: int,
    position: ReadPosition,
    rank: int = 0,
    world: int = 1,
    worker: int = 0,
    workers: int = 1,
    shuffle: bool = True,
) -> Iterator[RowBatch]:
    """Batches of `batch_rows` rows of one epoch's share, from `position.rows_seen` on. Indices sorted per batch."""
    share = split_order(epoch_order(reader.num_rows, position.seed, position.epoch, shuffle), rank, world, worker, workers)
    for start in range(position.rows_seen, len(share), batch_rows):
        yield reader.read_rows(np.sort(share[start : start + batch_rows]))
