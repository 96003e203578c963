"""Capture as real processes: killed with SIGKILL and resumed, and under torchrun with two ranks."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from storage.reader import CacheReader
from storage.verify import verify_cache

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def capture_cmd(teacher, data, out, *extra):
    return [sys.executable, "-m", "pipeline", "capture", teacher, data, "-o", str(out), "--quiet", *extra]


def rows_of(path):
    reader = CacheReader(str(path))
    return reader.read_rows(np.arange(reader.num_rows))


def assert_same_cache(a, b):
    ra, rb = rows_of(a), rows_of(b)
    order_a, order_b = np.argsort(ra.seq_id), np.argsort(rb.seq_id)
    np.testing.assert_array_equal(ra.seq_id[order_a], rb.seq_id[order_b])
    for i, j in zip(order_a, order_b):
        x, y = ra.row(i), rb.row(j)
        for key in x:
            if isinstance(x[key], list):
                assert all(np.array_equal(p, q) for p, q in zip(x[key], y[key])), key
            else:
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def slower_teacher(tmp_path_factory):
    """Wide enough that a capture takes seconds, so a kill lands in the middle of it."""
    from models import make_teacher

    return make_teacher(str(tmp_path_factory.mktemp("slow") / "gpt2"), n_layer=4, n_embd=256)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(slower_teacher, text_data, tmp_path):
    args = ("--mode", "sample", "--draws", "16", "--unit-rows", "2", "--batch-tokens", "64", "--seed", "7")
    full = tmp_path / "full"
    subprocess.run(capture_cmd(slower_teacher, text_data, full, *args), env=ENV, check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(capture_cmd(slower_teacher, text_data, killed, *args), env=ENV)
    commits = killed / "commits"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if commits.exists() and len(os.listdir(commits)) >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists(), "the capture finished before the kill; the test proves nothing"
    done_before = len(os.listdir(commits))
    assert 5 <= done_before < len(os.listdir(full / "commits"))

    res = subprocess.run(capture_cmd(slower_teacher, text_data, killed, *args), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert verify_cache(str(killed)) == []
    assert_same_cache(full, killed)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tiny_teacher, text_data, tmp_path):
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.fail("torchrun is not installed beside this python")
    args = ("--mode", "sample", "--draws", "8", "--unit-rows", "8", "--seed", "3")
    one = tmp_path / "one"
    subprocess.run(capture_cmd(tiny_teacher, text_data, one, *args), env=ENV, check=True)
    two = tmp_path / "two"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "pipeline", "capture", tiny_teacher,
           text_data, "-o", str(two), "--quiet", *args]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert verify_cache(str(two)) == []
    assert_same_cache(one, two)
    # both ranks wrote shards, named by work unit
    assert sorted(os.listdir(one / "shards")) == sorted(os.listdir(two / "shards"))
    assert os.path.exists(two / ".writer-1.lock")
