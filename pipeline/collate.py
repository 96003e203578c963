"""From the cache to torch tensors: the one place where storage's numpy batches meet torch."""

from __future__ import annotations

import numpy as np
import torch

from storage.reader import CacheReader


def to_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Wrap a padded numpy batch (see `CacheReader.read_padded`) as tensors without copying.

    Token ids of the teacher stay in their narrow stored type (uint16 or uint32): a quarter or half of the bytes to
    pin and move to the GPU; the loss widens them to int64 on the device.
    """
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def read_batch(reader: CacheReader, indices: np.ndarray, pad_id: int = 0, pad_to_multiple: int = 1) -> dict:
    """Rows at `indices` of a cache, padded, as torch tensors."""
    return to_tensors(reader.read_padded(indices, pad_id=pad_id, pad_to_multiple=pad_to_multiple))
