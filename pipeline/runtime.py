"""What the teacher stages share: torchrun ranks, length-bucketed batches, and a background shard writer."""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from storage.format import CacheHeader
from storage.rows import RowBatch
from storage.writer import CacheWriter


@dataclass
class Dist:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_dist(device_type: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def close_dist(dist: Dist) -> None:
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_stage(stage, cfg):
    """Run a teacher stage (capture, generate) in this process's place under torchrun, then leave the group.

    `stage(cfg, device, dist)` gets the device (this rank's GPU under torchrun) and the Dist; `cfg` has `device`
    and `quiet`.
    """
    from pipeline.teacher import quiet_libraries, resolve_device

    if cfg.quiet:
        quiet_libraries()
    device = resolve_device(cfg.device)
    dist = init_dist(device.type)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    try:
        return stage(cfg, device, dist)
    finally:
        close_dist(dist)


def plan_units(num_rows: int, unit_rows: int) -> list[tuple[int, int, int]]:
    """(unit, start, end) ranges of `unit_rows` sequences: one shard each, and the window for length bucketing."""
    return [(u, s, min(s + unit_rows, num_rows)) for u, s in enumerate(range(0, num_rows, unit_rows))]


def plan_batches(lengths: np.ndarray, batch_tokens: int, max_padding: float = 0.015) -> list[np.ndarray]:
    """Group rows into batches of at most `batch_tokens` padded tokens with little padding.

    Rows are sorted longest first inside the window, and a batch is closed when the next row would overflow the
    budget or push the batch's padding above `max_padding`; a row longer than the budget gets a batch of its own.
    The cap holds per batch, so it holds for the whole window. Returns index arrays into `lengths`.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, current, longest, total = [], [], 0, 0
    for i in order:
        n = int(lengths[i])
        if current:
            size = (len(current) + 1) * longest
            if size > batch_tokens or size - (total + n) > max_padding * size:
                batches.append(np.array(current))
                current, total = [], 0
        if not current:
            longest = n
        current.append(i)
        total += n
    if current:
        batches.append(np.array(current))
    return batches


def pad_batch(input_ids: list[np.ndarray], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) input ids and attention mask on `device` (causal attention never sees the padding)."""
    L = max(len(x) for x in input_ids)
    ids = np.full((len(input_ids), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(input_ids), L), dtype=np.int64)
    for b, x in enumerate(input_ids):
        ids[b, : len(x)] = x
        mask[b, : len(x)] = 1
    return torch.from_numpy(ids).to(device, non_blocking=True), torch.from_numpy(mask).to(device, non_blocking=True)


@dataclass
class Captured:
    """One batch of captured rows, still on the device; the background writer moves it to the host.

    rows: the token side (seq_id, offsets, input_ids, prompt_len, loss_mask, text), already on the host.
    topk: (values (T, k) float16, ids (T, k) int32) or None.
    sample: (n_unique (T,), ids (S,), counts (S,)) or None.
    """

    rows: RowBatch
    topk: tuple[torch.Tensor, torch.Tensor] | None = None
    sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class BackgroundWriter:
    """Moves captured batches to the host and writes shards in a thread, behind a bounded queue.

    The teacher never waits on the disk; a full queue (the disk is slower than the GPU) makes it wait, which bounds
    host memory. A writer error is raised in the main thread at the next `put` or at `close`.
    """

    def __init__(self, writer: CacheWriter, header: CacheHeader, max_pending: int = 8):
        self.writer, self.header = writer, header
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self.thread.start()

    def begin(self, unit: int) -> None:
        self._put(("begin", unit))

    def write(self, batch: Captured) -> None:
        self._put(("rows", batch))

    def end(self) -> None:
        self._put(("end", None))

    def close(self) -> None:
        """Wait for everything queued to be written; raise the writer's error if it had one."""
        self._put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise OSError(f"the shard writer failed: {self.error}") from self.error

    def _put(self, item) -> None:
        while True:
            self._raise()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        shard = None
        try:
            while (item := self.queue.get()) is not None:
                kind, payload = item
                if kind == "begin":
                    shard = self.writer.shard(payload)
                elif kind == "rows":
                    shard.write(self._to_host(payload))
                else:
                    shard.__exit__(None, None, None)
                    shard = None
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            self.error = e
            if shard is not None:
                shard.__exit__(type(e), e, None)
            while True:  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _to_host(self, batch: Captured) -> RowBatch:
        rows = batch.rows
        if batch.topk is not None:
            values, ids = batch.topk
            rows.topk_logprobs = values.cpu().numpy()
            rows.topk_ids = ids.cpu().numpy().astype(self.header.id_dtype)
        if batch.sample is not None:
            n_unique, ids, counts = (t.cpu().numpy() for t in batch.sample)
            rows.sample_offsets = np.concatenate([[0], np.cumsum(n_unique)])
            rows.sample_ids = ids.astype(self.header.id_dtype)
            rows.sample_counts = counts.astype(np.uint8)
        return rows
