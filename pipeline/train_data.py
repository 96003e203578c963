"""Caches as a map-style torch Dataset whose items are whole batches, for `transformers.Trainer`.

Why batches as items, not rows: the Trainer's sampler then shuffles batches with its own seeded generator, splits
them across ranks, and skips them exactly on `--resume`, so data order, DDP sharding and resumption are the
Trainer's well-tested machinery; each item is read out of the memory map in one vectorised copy
(`CacheReader.read_padded`), with no per-row collation in Python. Rows are grouped by length inside seeded
mega-batches (as `transformers`' LengthGroupedSampler does), so padding stays small.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.collate import to_tensors
from storage.reader import CacheReader


def parse_cache_arg(arg: str) -> tuple[str, float | None]:
    """'path' or 'path:weight' -> (path, weight or None)."""
    path, sep, weight = arg.rpartition(":")
    if sep and path and weight.replace(".", "", 1).isdigit():
        if float(weight) <= 0:
            raise ValueError(f"cache weight in {arg!r} must be positive")
        return path, float(weight)
    return arg, None


def mix_rows(ranges: list[tuple[int, int]], weights: list[float | None], rng: np.random.Generator) -> np.ndarray:
    """Global row indices of one epoch's mixture.

    Without weights: every row of every cache once. With weights: the epoch has as many rows as all caches
    together, and cache i makes up weight_i / sum(weights) of them: rows are repeated when a cache is oversampled
    and drawn without replacement when it is undersampled.
    """
    if all(w is None for w in weights):
        return np.concatenate([np.arange(s, e) for s, e in ranges])
    w = np.array([1.0 if x is None else x for x in weights])
    total = sum(e - s for s, e in ranges)
    parts = []
    for (start, end), share in zip(ranges, w / w.sum()):
        own, want = np.arange(start, end), int(round(share * total))
        parts += [own] * (want // len(own)) + [rng.choice(own, size=want % len(own), replace=False)]
    return np.concatenate(parts)


def plan_groups(lengths: np.ndarray, rows: np.ndarray, batch_size: int, rng: np.random.Generator,
                mega: int = 50) -> list[np.ndarray]:
    """Batches of `batch_size` row indices: a seeded shuffle, then sorting by length inside mega-batches."""
    rows = rng.permutation(rows)
    groups = []
    for start in range(0, len(rows), batch_size * mega):
        chunk = rows[start : start + batch_size * mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        groups += [np.sort(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
    return groups


class CacheBatches(torch.utils.data.Dataset):
    """Item i is the i-th batch (a dict of tensors) of one or several caches mixed by weight.

    Args:
        caches: [(path, weight or None)], mixed as `mix_rows` says.
        batch_size: rows per batch.
        seed: fixes the grouping and the weighted draws.
        pad_id: padding token id.
        allow_mixed_teachers: passed to the reader.
    """

    def __init__(self, caches: list[tuple[str, float | None]], batch_size: int, seed: int = 0, pad_id: int = 0,
                 allow_mixed_teachers: bool = False, pad_to_multiple: int = 8):
        self.paths = [p for p, _ in caches]
        self.weights = [w for _, w in caches]
        self.allow_mixed_teachers = allow_mixed_teachers
        self.pad_id, self.pad_to_multiple = pad_id, pad_to_multiple
        self._reader: CacheReader | None = None
        reader = self.reader
        rng = np.random.default_rng(seed)
        lengths = np.concatenate([np.diff(v.offsets) for _, _, v in reader.iter_shard_rows()])
        self.longest = int(lengths.max()) if len(lengths) else 0
        rows = mix_rows(reader.cache_rows, self.weights, rng)
        self.groups = plan_groups(lengths, rows, batch_size, rng)
        self.num_rows = sum(len(g) for g in self.groups)

    @property
    def reader(self) -> CacheReader:
        if self._reader is None:  # opened lazily, so DataLoader workers each map the files themselves
            self._reader = CacheReader(self.paths, allow_mixed_teachers=self.allow_mixed_teachers)
        return self._reader

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return to_tensors(self.reader.read_padded(self.groups[i], pad_id=self.pad_id,
                                                  pad_to_multiple=self.pad_to_multiple))


def unwrap_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The DataLoader's collate_fn: each item is already a batch (per-device batch size 1)."""
    if len(items) != 1:
        raise ValueError("CacheBatches items are whole batches: use per_device_train_batch_size=1")
    return items[0]


class TextBatches(torch.utils.data.Dataset):
    """Held-out text as batches for evaluation: input_ids, attention_mask, target_mask (no teacher)."""

    def __init__(self, sequences: list[np.ndarray], batch_size: int, pad_id: int = 0):
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        self.batches = [[sequences[j] for j in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seqs = self.batches[i]
        L = max(len(s) for s in seqs)
        ids = np.full((len(seqs), L), self.pad_id, dtype=np.int64)
        attn = np.zeros((len(seqs), L), dtype=bool)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
            attn[b, : len(s)] = True
        target = np.zeros_like(attn)
        target[:, :-1] = attn[:, 1:]
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
                "target_mask": torch.from_numpy(target)}
