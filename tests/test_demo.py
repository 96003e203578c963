"""kdcache demo on the shipped teacher, at a tiny budget: the whole flow runs and the report is complete."""

import json
import math
import os

import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error
from transformers import AutoModelForCausalLM

from pipeline.cli import main
from pipeline.demo import DATA, DemoConfig, demo


@pytest.mark.slow
def test_demo_flow_writes_a_complete_report(tmp_path):
    cfg = DemoConfig(output=str(tmp_path / "run"), paragraphs=120, prompts=6, new_tokens=12, steps=4, eval_steps=2,
                     batch_size=4)
    report = demo(cfg)
    saved = json.load(open(tmp_path / "run" / "report.json"))
    assert saved["teacher"]["perplexity"] == report["teacher"]["perplexity"] > 1
    assert set(saved["students"]) == {"ce", "topk", "sampled", "seqkd"}
    for name, s in saved["students"].items():
        assert s["perplexity"] > 1 and s["kl_to_teacher"] >= 0
        AutoModelForCausalLM.from_pretrained(s["dir"])  # a usable saved student
    assert set(saved["cache"]) == {"topk", "sampled", "seqkd", "heldout"}
    assert all(c["bytes_per_token"] > 0 and c["tokens"] > 0 for c in saved["cache"].values())
    assert {"prompt", "teacher", "ce", saved["best_distilled"]} <= set(saved["samples"])
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| topk |" in md and "gap closed" in md
    assert (tmp_path / "run" / "curves.png").stat().st_size > 5000


def test_shipped_teacher_is_small_and_recorded():
    teacher = os.path.join(DATA, "teacher")
    size = sum(os.path.getsize(os.path.join(teacher, f)) for f in os.listdir(teacher))
    assert size < 25 * 2**20
    info = json.load(open(os.path.join(teacher, "training.json")))
    assert info["held_out_perplexity"] == pytest.approx(math.exp(info["held_out_loss"]), rel=1e-3)


def test_demo_refuses_a_missing_teacher(tmp_path):
    with pytest.raises(FileNotFoundError, match="the demo runs from a kdcache checkout"):
        demo(DemoConfig(output=str(tmp_path / "r"), teacher=str(tmp_path / "nope")))


@pytest.mark.parametrize("args, fragments", [
    (["--steps", "0"], ["--steps 0 must be at least 1"]),
    (["-o", "{file}"], ["is a file, not a directory", "give a directory"]),
])
def test_demo_cli_refuses_bad_settings_at_once(tmp_path, args, fragments):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    args = [a.format(file=a_file) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "run")]
    res = CliRunner().invoke(main, ["demo", *args])
    assert_one_line_error(res, *fragments)
    assert a_file.read_text() == "keep me" and not (tmp_path / "run").exists()  # refused before any work
