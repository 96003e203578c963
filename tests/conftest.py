import json
import os
import sys

import pytest

# Two cores: one torch thread per process keeps tests beside each other from oversubscribing the machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from rowgen import random_rows  # noqa: E402

from storage.format import CacheHeader  # noqa: E402
from storage.writer import CacheWriter  # noqa: E402


def assert_one_line_error(res, *fragments):
    """A CLI result that failed with one line naming each fragment, and no traceback."""
    assert res.exit_code != 0
    assert "Traceback" not in res.output and res.output.strip().count("\n") == 0, res.output
    for f in fragments:
        assert f in res.output, res.output


def write_cache(path, header, shards, seed=0):
    """A complete cache with one shard per list of row lengths; returns the rows written per shard."""
    written, first = [], 0
    with CacheWriter(str(path), header) as w:
        for unit, lengths in enumerate(shards):
            rows = random_rows(header, lengths, seed=seed + unit, first_seq_id=first)
            first += len(lengths)
            with w.shard(unit) as s:
                s.write(rows)
            written.append(rows)
        w.finalize()
    return written


@pytest.fixture
def topk_header():
    return CacheHeader(mode="topk", vocab_size=300, k=8, teacher={"id": "tiny-teacher"},
                       tokenizer={"fingerprint": "abc", "vocab_size": 300})


@pytest.fixture
def sample_header():
    return CacheHeader(mode="sample", vocab_size=300, draws=20, teacher={"id": "tiny-teacher"},
                       tokenizer={"fingerprint": "abc", "vocab_size": 300})


@pytest.fixture
def small_cache(tmp_path, topk_header):
    path = tmp_path / "cache"
    write_cache(path, topk_header, [[5, 3, 0, 7], [4, 1], [6, 6, 2]])
    return str(path)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    from models import make_teacher

    return make_teacher(str(tmp_path_factory.mktemp("teacher") / "gpt2-tiny"))


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """A jsonl file of short Shakespeare passages of varied length, with one empty row."""
    from models import shakespeare_lines

    lines = shakespeare_lines(240)
    rows = [{"text": " ".join(lines[i : i + 1 + i % 7])} for i in range(0, 240, 4)]
    rows.insert(5, {"text": "   "})
    path = tmp_path_factory.mktemp("data") / "plays.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def caches(tiny_teacher, text_data, tmp_path_factory):
    """A top-k and a sampled cache of the tiny teacher over the test text."""
    from pipeline.capture import CaptureConfig, capture

    root = tmp_path_factory.mktemp("caches")
    capture(CaptureConfig(teacher=tiny_teacher, data=text_data, output=str(root / "topk"), top_k=16, quiet=True))
    capture(CaptureConfig(teacher=tiny_teacher, data=text_data, output=str(root / "sample"), mode="sample",
                          draws=20, quiet=True))
    return {"topk": str(root / "topk"), "sample": str(root / "sample")}


@pytest.fixture(scope="session")
def student_config(tmp_path_factory):
    """A config.json for a student smaller than the tiny teacher, same vocabulary."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("student")
    GPT2Config(vocab_size=384, n_layer=1, n_embd=16, n_head=2, n_positions=64).save_pretrained(path)
    return str(path / "config.json")
