"""The kdcache on-disk format: constants, errors, the Arrow schema and the header every cache carries.

This module knows bytes and schemas only (pyarrow, numpy, the standard library); it never imports torch.

A cache is a directory:

    CACHE/header.json                what is being captured (written first, atomically)
    CACHE/commits/part-NNNNNN.json   one commit record per finished shard (written after the shard)
    CACHE/shards/part-NNNNNN.arrow   Arrow IPC file format, one row per sequence
    CACHE/manifest.json              written last; "status": "complete" means the cache is whole
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 1
POSITION_CONVENTION = "position t holds the teacher's distribution over token t+1"
MODES = ("topk", "sample")
# Counts of draws are stored as uint8, so one position can take at most 255 draws.
MAX_DRAWS = 255

MANIFEST = "manifest.json"
HEADER = "header.json"
SHARDS_DIR = "shards"
COMMITS_DIR = "commits"


class CacheError(ValueError):
    """Base class of kdcache's domain errors; the CLI turns these into one-line messages."""


class CacheFormatError(CacheError):
    """The bytes on disk are not a sound kdcache cache (missing, incomplete, corrupt, unknown version)."""


class CacheMismatchError(CacheError):
    """Two things that must agree do not (settings of a resumed capture, caches read together, a tokenizer)."""


class CacheLockedError(CacheError):
    """Another writer holds the cache."""


def shard_name(unit: int) -> str:
    """Shard file name of a work unit: names come from work units, never from writer processes."""
    return f"part-{unit:06d}.arrow"


def id_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every token id of a vocabulary."""
    if vocab_size <= 0:
        raise CacheFormatError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65_536 else np.dtype(np.uint32)


@dataclass
class CacheHeader:
    """Everything that identifies what a cache holds. Stored in header.json and, with totals, in the manifest.

    Attributes:
        mode: "topk" (k largest log-probs per position) or "sample" (unique ids and counts of N draws).
        vocab_size: size of the teacher's output distribution (the model's logits width).
        k: top-k width, for mode "topk".
        draws: number of draws N per position, for mode "sample".
        loss_mask: whether rows carry an explicit `loss_mask` column (chat data).
        text: whether rows carry a `text` column (generated sequences).
        teacher: {"id", "revision", "config_fingerprint"}.
        tokenizer: {"fingerprint", "vocab_size", "chat_template", "name_or_path"}.
        dataset: {"fingerprint", ...} of the source data.
        config: the resolved settings of the stage that wrote the cache.
    """

    mode: str
    vocab_size: int
    k: int | None = None
    draws: int | None = None
    loss_mask: bool = False
    text: bool = False
    teacher: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.vocab_size is None or int(self.vocab_size) <= 0:
            problems.append(f"vocab_size must be positive, got {self.vocab_size}")
        if self.mode == "topk" and (self.k is None or not 1 <= int(self.k) <= int(self.vocab_size or 0)):
            problems.append(f"top-k {self.k} must be between 1 and the vocabulary size {self.vocab_size}")
        if self.mode == "sample" and (self.draws is None or not 1 <= int(self.draws) <= MAX_DRAWS):
            problems.append(f"draws {self.draws} must be between 1 and {MAX_DRAWS}")
        if problems:
            raise CacheFormatError("; ".join(problems))

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype_for_vocab(self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "position_convention": POSITION_CONVENTION,
            "id_dtype": self.id_dtype.name,
            **asdict(self),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheHeader":
        check_format_version(d, where="header")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def schema(self) -> pa.Schema:
        """The Arrow schema of every shard of this cache, with self-describing metadata."""
        id_type = pa.from_numpy_dtype(self.id_dtype)
        fields = [
            pa.field("seq_id", pa.uint64(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("prompt_len", pa.int32(), nullable=False),
        ]
        if self.loss_mask:
            fields.append(pa.field("loss_mask", pa.list_(pa.uint8()), nullable=False))
        if self.mode == "topk":
            fields.append(pa.field("topk_ids", pa.list_(pa.list_(id_type, self.k)), nullable=False))
            fields.append(pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16(), self.k)), nullable=False))
        else:
            fields.append(pa.field("sample_ids", pa.list_(pa.list_(id_type)), nullable=False))
            fields.append(pa.field("sample_counts", pa.list_(pa.list_(pa.uint8())), nullable=False))
        if self.text:
            fields.append(pa.field("text", pa.large_string(), nullable=False))
        meta = {
            "kdcache.format_version": str(FORMAT_VERSION),
            "kdcache.mode": self.mode,
            "kdcache.k": str(self.k or ""),
            "kdcache.draws": str(self.draws or ""),
            "kdcache.vocab_size": str(self.vocab_size),
            "kdcache.position_convention": POSITION_CONVENTION,
            "kdcache.teacher": str(self.teacher.get("id", "")),
            "kdcache.teacher_revision": str(self.teacher.get("revision") or ""),
            "kdcache.tokenizer_fingerprint": str(self.tokenizer.get("fingerprint", "")),
        }
        return pa.schema(fields, metadata=meta)


def check_format_version(d: dict[str, Any], where: str) -> None:
    if d.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{where} is not a kdcache file (format={d.get('format')!r})")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheFormatError(
            f"{where} has format version {version!r}, this kdcache reads version {FORMAT_VERSION} "
            "(upgrade kdcache, or recapture the cache)"
        )


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, and rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CacheFormatError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{what} {path} is not valid JSON ({e}); the cache is damaged, recapture it") from None
