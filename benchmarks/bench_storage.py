"""Storage benchmark: write and read throughput, the reader against a plain memcpy, and bytes per token.

    python benchmarks/bench_storage.py [--quick] [--json PATH]

Everything compared runs in this one process, one after the other, and is reported as ratios, since the machines
are shared and absolute numbers drift. read_vs_memcpy: rows read from the memory-mapped cache into padded torch
batches, in shuffled order, over a plain copy of the same number of bytes out of the same files (target >= 0.3).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.collate import read_batch  # noqa: E402
from storage.format import CacheHeader  # noqa: E402
from storage.reader import CacheReader, epoch_order  # noqa: E402
from storage.rows import RowBatch, take_rows  # noqa: E402
from storage.writer import CacheWriter  # noqa: E402

VOCAB = 50_257  # GPT-2's


def synthetic_rows(header: CacheHeader, n_rows: int, mean_len: int, rng: np.random.Generator, first: int) -> RowBatch:
    """Rows shaped like a real capture: variable lengths, sorted top-k, or Zipf-like draws with ~12 unique ids."""
    lengths = np.clip(rng.normal(mean_len, mean_len / 3, n_rows).astype(np.int64), 1, 4 * mean_len)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    T = int(offsets[-1])
    rows = RowBatch(
        seq_id=np.arange(first, first + n_rows, dtype=np.uint64),
        offsets=offsets,
        input_ids=rng.integers(0, VOCAB, T).astype(np.int32),
        prompt_len=np.zeros(n_rows, dtype=np.int32),
    )
    if header.mode == "topk":
        rows.topk_ids = rng.integers(0, VOCAB, (T, header.k)).astype(header.id_dtype)
        rows.topk_logprobs = -np.sort(rng.exponential(2.0, (T, header.k)), axis=1).astype(np.float16) - 0.1
    else:
        draws = np.sort((rng.zipf(1.6, (T, header.draws)) - 1) % VOCAB, axis=1)
        new = np.ones_like(draws, dtype=bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        ids = draws[new]
        starts = np.flatnonzero(new.reshape(-1))
        counts = np.diff(np.append(starts, draws.size))
        rows.sample_offsets = np.concatenate([[0], np.cumsum(new.sum(1))])
        rows.sample_ids, rows.sample_counts = ids.astype(header.id_dtype), counts.astype(np.uint8)
    return rows


def build_cache(path: str, header: CacheHeader, n_shards: int, rows_per_shard: int, mean_len: int) -> float:
    """Write a cache; returns seconds spent writing (row generation excluded)."""
    rng = np.random.default_rng(0)
    spent = 0.0
    with CacheWriter(path, header) as w:
        for unit in range(n_shards):
            rows = synthetic_rows(header, rows_per_shard, mean_len, rng, unit * rows_per_shard)
            t0 = time.perf_counter()
            with w.shard(unit) as s:
                for start in range(0, rows_per_shard, 256):
                    idx = np.arange(start, min(start + 256, rows_per_shard))
                    s.write(take_rows(rows, idx))
            spent += time.perf_counter() - t0
        t0 = time.perf_counter()
        w.finalize()
        spent += time.perf_counter() - t0
    return spent


def read_padded(path: str, batch_rows: int) -> tuple[float, int]:
    """Seconds to read one shuffled epoch into padded torch batches, and the tokens read."""
    reader = CacheReader(path)
    tokens = 0
    t0 = time.perf_counter()
    order = epoch_order(reader.num_rows, seed=0, epoch=0)
    for start in range(0, len(order), batch_rows):
        batch = read_batch(reader, order[start : start + batch_rows])
        tokens += int(batch["attention_mask"].sum())
    return time.perf_counter() - t0, tokens


def memcpy_files(path: str) -> tuple[float, int]:
    """Seconds to copy every shard's bytes out of a memory map into one buffer, and the bytes copied."""
    files = sorted(glob.glob(os.path.join(path, "shards", "part-*.arrow")))
    total = sum(os.path.getsize(f) for f in files)
    out = np.empty(max(os.path.getsize(f) for f in files), dtype=np.uint8)
    t0 = time.perf_counter()
    for f in files:
        src = np.memmap(f, dtype=np.uint8, mode="r")
        np.copyto(out[: len(src)], src)
        del src
    return time.perf_counter() - t0, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # Full size: rows of ~2048 tokens, the capture default for real teachers (--max-length: context, at most 2048).
    n_shards, rows_per_shard, mean_len = (2, 256, 256) if args.quick else (4, 256, 2048)
    results: dict = {"vocab": VOCAB, "rows": n_shards * rows_per_shard, "mean_len": mean_len, "bytes_per_token": {}}
    with tempfile.TemporaryDirectory() as tmp:
        configs = [("topk", k) for k in (8, 32, 64, 128)] + [("sample", 50)]
        for mode, n in configs:
            name = f"topk{n}" if mode == "topk" else f"sample{n}"
            header = CacheHeader(mode=mode, vocab_size=VOCAB, k=n if mode == "topk" else None,
                                 draws=n if mode == "sample" else None, teacher={"id": "synthetic"})
            path = os.path.join(tmp, name)
            write_s = build_cache(path, header, n_shards, rows_per_shard, mean_len)
            m = json.load(open(os.path.join(path, "manifest.json")))
            tokens, nbytes = m["totals"]["tokens"], m["totals"]["bytes"]
            results["bytes_per_token"][name] = round(nbytes / tokens, 2)
            if name in ("topk64", "sample50"):
                memcpy_files(path)  # warm the page cache so both sides read from memory
                read_s, read_tokens = read_padded(path, batch_rows=16)
                copy_s, copied = memcpy_files(path)
                assert read_tokens == tokens
                results[name] = {
                    "write_MB_per_s": round(nbytes / write_s / 1e6, 1),
                    "write_tokens_per_s": round(tokens / write_s),
                    "read_padded_tokens_per_s": round(tokens / read_s),
                    "read_MB_per_s": round(nbytes / read_s / 1e6, 1),
                    "memcpy_MB_per_s": round(copied / copy_s / 1e6, 1),
                    "read_vs_memcpy": round((nbytes / read_s) / (copied / copy_s), 3),
                }
                if mode == "sample":
                    results[name]["mean_unique_ids_per_position"] = round(
                        float(np.mean(np.diff(CacheReader(path).read_rows(np.arange(8)).sample_offsets))), 2)
        results["bytes_per_token"]["dense_fp16"] = 2 * VOCAB
    results["read_vs_memcpy"] = min(results["topk64"]["read_vs_memcpy"], results["sample50"]["read_vs_memcpy"])
    print(json.dumps(results, indent=2))
    print(f"read_vs_memcpy {results['read_vs_memcpy']:.3f} (target >= 0.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
