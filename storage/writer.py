"""The cache writer: shards streamed to temporary files, committed one by one, the manifest written last.

Crash safety, in order of what hits the disk for one work unit:
  1. shards/.part-NNNNNN.arrow.tmp-PID  record batches streamed in, then flushed and fsynced
  2. shards/part-NNNNNN.arrow           renamed into place
  3. commits/part-NNNNNN.json           the commit record (rows, tokens, bytes, sha256), written atomically
A killed writer loses at most the shard in flight: a shard without its commit record is redone on restart, and a
reader refuses any cache without a complete manifest. The manifest is written by `finalize()` from the commit records.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
from typing import Any

import pyarrow as pa

from storage.format import (
    COMMITS_DIR,
    HEADER,
    MANIFEST,
    SHARDS_DIR,
    CacheFormatError,
    CacheHeader,
    CacheLockedError,
    CacheMismatchError,
    fsync_dir,
    read_json,
    shard_name,
    write_json_atomic,
)
from storage.rows import RowBatch, to_record_batch

# Header fields whose difference makes a resumed capture a different cache. `config` is compared key by key.
_IDENTITY_FIELDS = ("mode", "vocab_size", "k", "draws", "loss_mask", "text", "teacher", "tokenizer", "dataset")


def file_sha256(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def header_differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Names and values of the identity fields that differ between two header dicts."""
    diffs = []
    for name in _IDENTITY_FIELDS:
        if old.get(name) != new.get(name):
            diffs.append(f"{name}: {old.get(name)!r} != {new.get(name)!r}")
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in ignore and old_cfg.get(key) != new_cfg.get(key):
            diffs.append(f"{key}: {old_cfg.get(key)!r} != {new_cfg.get(key)!r}")
    return diffs


class ShardWriter:
    """Streams record batches of one work unit into a temporary Arrow IPC file; see CacheWriter.shard."""

    def __init__(self, cache: "CacheWriter", unit: int):
        self.cache, self.unit = cache, unit
        self.path = os.path.join(cache.path, SHARDS_DIR, shard_name(unit))
        self.tmp = os.path.join(cache.path, SHARDS_DIR, f".{shard_name(unit)}.tmp-{os.getpid()}")
        self.rows = self.tokens = 0
        self._sink = pa.OSFile(self.tmp, "wb")
        self._writer = pa.ipc.new_file(self._sink, cache.schema)

    def write(self, rows: RowBatch) -> None:
        """Append rows to the shard."""
        if rows.num_rows == 0:
            return
        self._writer.write_batch(to_record_batch(rows, self.cache.header))
        self.rows += rows.num_rows
        self.tokens += rows.num_tokens

    def _commit(self) -> None:
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        digest = file_sha256(self.tmp)
        size = os.path.getsize(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path))
        record = {
            "path": f"{SHARDS_DIR}/{shard_name(self.unit)}",
            "unit": self.unit,
            "rows": self.rows,
            "tokens": self.tokens,
            "bytes": size,
            "sha256": digest,
        }
        write_json_atomic(os.path.join(self.cache.path, COMMITS_DIR, shard_name(self.unit) + ".json"), record)
        self.cache._committed[self.unit] = record

    def _abort(self) -> None:
        try:
            self._writer.close()
        except Exception:
            pass
        self._sink.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._commit()
        else:
            self._abort()


class CacheWriter:
    """Writes one cache directory. One writer per (cache, writer_id); several ranks use distinct writer_ids.

    Usage:
        with CacheWriter(path, header) as w:
            for unit in units:
                if w.is_committed(unit):
                    continue  # resumed: done before the crash
                with w.shard(unit) as s:
                    s.write(rows)
            w.finalize()  # one process only, once every unit is committed

    Args:
        path: the cache directory (created if missing).
        header: what the cache holds; compared with an existing cache's header.json.
        writer_id: distinguishes the processes that write one cache together (the torchrun rank).
        overwrite: delete whatever cache is at `path` first (only once this writer holds the lock).
        ignore_config: config keys that may differ on resume (batch size, progress bars...).

    Raises:
        CacheLockedError: another writer with the same writer_id holds the cache.
        CacheMismatchError: the cache at `path` was written with other settings (and not `overwrite`).
    """

    def __init__(
        self,
        path: str,
        header: CacheHeader,
        writer_id: int = 0,
        overwrite: bool = False,
        ignore_config: tuple[str, ...] = (),
    ):
        self.path, self.header, self.writer_id = path, header, writer_id
        self.schema = header.schema()
        if os.path.exists(path) and not os.path.isdir(path):
            raise CacheFormatError(f"cache path {path} is a file, not a directory; choose another -o")
        os.makedirs(path, exist_ok=True)
        self._lock_fd = self._lock()
        try:
            if overwrite:
                self._wipe()
            self._committed: dict[int, dict] = {}
            self.already_complete = self._open_existing(ignore_config)
            os.makedirs(os.path.join(path, SHARDS_DIR), exist_ok=True)
            os.makedirs(os.path.join(path, COMMITS_DIR), exist_ok=True)
            self._load_commits()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> int:
        fd = os.open(os.path.join(self.path, f".writer-{self.writer_id}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLockedError(
                f"cache {self.path} is being written by another process (writer {self.writer_id}); "
                "wait for it to finish or write to another directory"
            ) from None
        return fd

    def _wipe(self) -> None:
        # The manifest goes first, so a crash in the middle never leaves a cache that looks complete.
        for name in (MANIFEST, HEADER):
            p = os.path.join(self.path, name)
            if os.path.exists(p):
                os.unlink(p)
        for sub in (COMMITS_DIR, SHARDS_DIR):
            shutil.rmtree(os.path.join(self.path, sub), ignore_errors=True)
        fsync_dir(self.path)

    def _open_existing(self, ignore_config: tuple[str, ...]) -> bool:
        """Compare with what is on disk; write header.json for a new cache. Returns True if already complete."""
        header_path = os.path.join(self.path, HEADER)
        new = self.header.to_dict()
        if not os.path.exists(header_path):
            leftovers = [n for n in os.listdir(self.path) if not n.startswith(".")]
            if leftovers:
                raise CacheMismatchError(
                    f"{self.path} is not empty and holds no kdcache header ({', '.join(sorted(leftovers)[:3])}); "
                    "choose an empty directory or pass --overwrite"
                )
            write_json_atomic(header_path, new)
            return False
        old = read_json(header_path, "cache header")
        diffs = header_differences(old, new, ignore_config)
        if diffs:
            raise CacheMismatchError(
                f"cache {self.path} was written with other settings ({'; '.join(diffs)}); "
                "use the same settings to resume, another -o, or --overwrite"
            )
        manifest = os.path.join(self.path, MANIFEST)
        return os.path.exists(manifest) and read_json(manifest, "manifest").get("status") == "complete"

    def _load_commits(self) -> None:
        for rec_path in glob.glob(os.path.join(self.path, COMMITS_DIR, "part-*.arrow.json")):
            rec = read_json(rec_path, "commit record")
            shard = os.path.join(self.path, rec["path"])
            # A commit record is trusted only while its shard is there with the recorded size.
            if os.path.exists(shard) and os.path.getsize(shard) == rec["bytes"]:
                self._committed[int(rec["unit"])] = rec
        # Temporary files of a writer that died are garbage; ours have our pid and do not exist yet.
        for tmp in glob.glob(os.path.join(self.path, SHARDS_DIR, ".part-*.tmp-*")):
            os.unlink(tmp)

    def is_committed(self, unit: int) -> bool:
        return unit in self._committed

    def committed_units(self) -> list[int]:
        return sorted(self._committed)

    def shard(self, unit: int) -> ShardWriter:
        """A context manager that writes work unit `unit` to its shard and commits it on a clean exit."""
        if unit in self._committed:
            raise CacheFormatError(f"work unit {unit} is already committed in {self.path}")
        return ShardWriter(self, unit)

    def finalize(self, expected_units: list[int] | None = None, extra: dict[str, Any] | None = None) -> dict:
        """Write manifest.json from every commit record on disk (all writers'), last and atomically.

        Args:
            expected_units: the units the cache must hold; a missing one is an error, not a short cache.
            extra: more fields for the manifest (timings, statistics).
        """
        self._committed = {}
        self._load_commits()
        if expected_units is not None:
            missing = sorted(set(expected_units) - set(self._committed))
            if missing:
                raise CacheFormatError(
                    f"cannot finalize {self.path}: work units {missing[:5]} are not committed; rerun to resume"
                )
        shards = [self._committed[u] for u in sorted(self._committed)]
        manifest = {
            **self.header.to_dict(),
            "status": "complete",
            "totals": {
                "rows": sum(s["rows"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
                "shards": len(shards),
            },
            **(extra or {}),
            "shards": shards,
        }
        write_json_atomic(os.path.join(self.path, MANIFEST), manifest)
        return manifest

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
