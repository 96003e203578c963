"""`kdcache verify` and `kdcache inspect`: re-hash every shard, check every invariant, summarise a cache."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from storage.format import CacheError, CacheHeader
from storage.reader import load_manifest, same_schema
from storage.rows import from_arrow
from storage.writer import file_sha256

# float16 keeps 11 significant bits: a sum of k probabilities each off by 2^-11 relative stays within this.
MASS_TOLERANCE = 2e-3
LOGPROB_TOLERANCE = 1e-3


def _offsets(col: pa.Array) -> np.ndarray:
    o = col.offsets.to_numpy()
    return o - o[0]


def check_rows(batch: pa.RecordBatch, header: CacheHeader) -> list[str]:
    """Invariant violations in one record batch (empty when sound)."""
    faults = []
    tok_offsets = _offsets(batch.column("input_ids"))
    lengths = np.diff(tok_offsets)
    list_cols = ["loss_mask"] if header.loss_mask else []
    list_cols += ["topk_ids", "topk_logprobs"] if header.mode == "topk" else ["sample_ids", "sample_counts"]
    for name in list_cols:
        if not np.array_equal(_offsets(batch.column(name)), tok_offsets):
            faults.append(f"column {name} does not have one entry per token")
    if faults:
        return faults
    rows = from_arrow(batch, header)
    if len(rows.input_ids) and (rows.input_ids.min() < 0 or rows.input_ids.max() >= header.vocab_size):
        faults.append(f"input_ids outside [0, {header.vocab_size})")
    if np.any(rows.prompt_len < 0) or np.any(rows.prompt_len > lengths):
        faults.append("prompt_len outside [0, row length]")
    if rows.loss_mask is not None and np.any(rows.loss_mask > 1):
        faults.append("loss_mask holds values other than 0 and 1")
    # Positions that must hold a distribution: every one of a captured row (prompt_len 0); in a generated row,
    # from the last prompt token to the second-to-last token (others may be absent: all -inf, or no ids).
    pos = np.arange(rows.num_tokens) - np.repeat(rows.offsets[:-1], lengths)
    p, n = np.repeat(rows.prompt_len.astype(np.int64), lengths), np.repeat(lengths, lengths)
    required = (pos >= p - 1) & ((pos <= n - 2) | (p == 0))
    if header.mode == "topk" and rows.num_tokens:
        ids, lps = rows.topk_ids, rows.topk_logprobs.astype(np.float32)
        if ids.max() >= header.vocab_size:
            faults.append(f"top-k ids >= vocab size {header.vocab_size}")
        if np.any(np.isnan(lps)) or np.any(lps == np.inf):
            faults.append("top-k log-probs hold NaN or +inf")
        if np.any(lps > LOGPROB_TOLERANCE):
            faults.append(f"top-k log-probs above 0 (max {lps.max():.4g})")
        with np.errstate(invalid="ignore"):  # -inf - -inf in rows that hold no distribution
            unsorted = np.any(np.diff(lps, axis=1) > 0)
        if unsorted:
            faults.append("top-k log-probs not sorted in descending order")
        mass = np.exp(lps).sum(axis=1)
        if np.any(mass > 1 + MASS_TOLERANCE):
            faults.append(f"top-k mass above 1 (max {mass.max():.5f})")
        if np.any(np.isneginf(lps[:, 0]) & required):
            faults.append("positions that must hold a teacher distribution hold none")
    if header.mode == "sample" and rows.num_tokens:
        so = rows.sample_offsets
        if rows.sample_ids.size and rows.sample_ids.max() >= header.vocab_size:
            faults.append(f"sample ids >= vocab size {header.vocab_size}")
        if np.any(rows.sample_counts == 0):
            faults.append("sample counts of zero")
        cum = np.concatenate([[0], np.cumsum(rows.sample_counts, dtype=np.int64)])
        sums = cum[so[1:]] - cum[so[:-1]]
        if np.any(sums[required] != header.draws) or np.any((sums != 0) & (sums != header.draws)):
            faults.append(f"sample counts do not sum to N={header.draws} at every position")
        # ids are stored ascending and unique within a position
        steps = np.diff(rows.sample_ids.astype(np.int64))
        inside = np.ones(len(steps), dtype=bool)
        ends = so[1:-1] - 1
        inside[ends[(ends >= 0) & (ends < len(steps))]] = False
        if np.any(steps[inside] <= 0):
            faults.append("sample ids not unique and ascending within a position")
    return faults


def verify_cache(path: str) -> list[str]:
    """Every fault found in a cache, one line each naming the file; an empty list means sound."""
    try:
        manifest = load_manifest(path)
        header = CacheHeader.from_dict(manifest)
    except CacheError as e:
        return [str(e)]
    faults = []
    total_rows = total_tokens = 0
    seq_ids = []
    for shard in manifest["shards"]:
        name = shard["path"]
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath):
            faults.append(f"{name}: missing")
            continue
        if os.path.getsize(fpath) != shard["bytes"]:
            faults.append(f"{name}: {os.path.getsize(fpath)} bytes, manifest says {shard['bytes']} (truncated?)")
        if file_sha256(fpath) != shard["sha256"]:
            faults.append(f"{name}: sha256 differs from the manifest (corrupt)")
            continue
        try:
            reader = pa.ipc.open_file(pa.memory_map(fpath, "r"))
            if not same_schema(reader.schema, header.schema()):
                faults.append(f"{name}: schema differs from the manifest's")
                continue
            rows = tokens = 0
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                faults += [f"{name}: {f}" for f in check_rows(batch, header)]
                rows += batch.num_rows
                tokens += int(_offsets(batch.column("input_ids"))[-1])
                seq_ids.append(batch.column("seq_id").to_numpy())
        except (pa.ArrowInvalid, OSError) as e:
            faults.append(f"{name}: unreadable Arrow file ({e})")
            continue
        if rows != shard["rows"] or tokens != shard["tokens"]:
            faults.append(f"{name}: holds {rows} rows / {tokens} tokens, manifest says {shard['rows']} / {shard['tokens']}")
        total_rows, total_tokens = total_rows + rows, total_tokens + tokens
    totals = manifest["totals"]
    if not faults and (total_rows != totals["rows"] or total_tokens != totals["tokens"]):
        faults.append(f"manifest.json: totals {totals['rows']} rows / {totals['tokens']} tokens, shards hold "
                      f"{total_rows} / {total_tokens}")
    if seq_ids:
        all_ids = np.concatenate(seq_ids)
        if len(np.unique(all_ids)) != len(all_ids):
            faults.append("manifest.json: seq_id values repeat across rows")
    return faults


def summarize(path: str) -> dict[str, Any]:
    """What `kdcache inspect` prints: teacher, tokenizer, mode, sizes and the shard table."""
    manifest = load_manifest(path)
    totals = manifest["totals"]
    return {
        "path": path,
        "format_version": manifest["format_version"],
        "teacher": manifest.get("teacher", {}),
        "tokenizer": {k: v for k, v in manifest.get("tokenizer", {}).items() if k != "chat_template"},
        "mode": manifest["mode"],
        "k": manifest.get("k"),
        "draws": manifest.get("draws"),
        "vocab_size": manifest["vocab_size"],
        "id_dtype": manifest["id_dtype"],
        "rows": totals["rows"],
        "tokens": totals["tokens"],
        "bytes": totals["bytes"],
        "bytes_per_token": totals["bytes"] / max(totals["tokens"], 1),
        "position_convention": manifest["position_convention"],
        "shards": [{k: s[k] for k in ("path", "rows", "tokens", "bytes")} for s in manifest["shards"]],
    }


def format_summary(s: dict[str, Any]) -> str:
    mode = f"top-k, k={s['k']}" if s["mode"] == "topk" else f"sampled, N={s['draws']} draws"
    lines = [
        f"cache      {s['path']}",
        f"teacher    {s['teacher'].get('id')} (revision {s['teacher'].get('revision') or '-'})",
        f"tokenizer  {s['tokenizer'].get('fingerprint', '-')[:16]}  vocab {s['vocab_size']} ({s['id_dtype']} ids)",
        f"mode       {mode}",
        f"rows       {s['rows']:,}",
        f"tokens     {s['tokens']:,}",
        f"bytes      {s['bytes']:,}  ({s['bytes_per_token']:.1f} per token)",
        f"shards     {len(s['shards'])}",
    ]
    lines += [f"  {sh['path']}  rows {sh['rows']:>8,}  tokens {sh['tokens']:>11,}  bytes {sh['bytes']:>13,}"
              for sh in s["shards"][:50]]
    if len(s["shards"]) > 50:
        lines.append(f"  ... {len(s['shards']) - 50} more")
    return "\n".join(lines)
