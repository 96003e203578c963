"""kdcache train and eval: end to end on tiny caches, resume, mixing, and every rejection."""

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config

from pipeline.cli import main
from pipeline.train import TrainConfig, train


def run_train(caches, out, student, **kw):
    kw.setdefault("max_steps", 6)
    kw.setdefault("save_steps", 100)
    return train(TrainConfig(caches=caches, output=str(out), student=student, quiet=True, **kw))


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_train_saves_a_working_student(caches, student_config, text_data, tmp_path, mode):
    summary = run_train([caches[mode]], tmp_path / "run", student_config, max_steps=12, lr=3e-3,
                        eval_data=text_data, eval_steps=6, logging_steps=2)
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(run)  # save_pretrained layout: config + model.safetensors
    assert (run / "model.safetensors").exists() and (run / "tokenizer.json").exists()
    assert sum(p.numel() for p in model.parameters()) == summary["student"]["parameters"]
    info = json.load(open(run / "kdcache.json"))
    assert info["caches"][0]["mode"] == mode and len(info["caches"][0]["fingerprint"]) == 64
    assert info["config"]["loss"] == "fkl" and info["final_metrics"]["steps"] == 12
    assert info["final_metrics"]["eval_perplexity"] > 1
    logs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    kd = [r["kd"] for r in logs if "kd" in r]
    assert len(kd) >= 5 and kd[-1] < kd[0]  # the student moves toward the teacher
    assert any("eval_loss" in r for r in logs)
    assert (run / "curves.png").stat().st_size > 1000


def test_resume_equals_uninterrupted(caches, student_config, tmp_path):
    full = tmp_path / "full"
    run_train([caches["topk"]], full, student_config, max_steps=6, save_steps=3, lr=3e-3)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")  # as if killed after step 3
    run_train([caches["topk"]], part, student_config, max_steps=6, save_steps=3, lr=3e-3, resume=True)
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    third = load_file(full / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(a[k], third[k]) for k in a)  # training went on after the checkpoint


def test_ce_weight_one_ignores_the_teacher(caches, student_config, tmp_path):
    run_train([caches["topk"]], tmp_path / "a", student_config, ce_weight=1.0)
    run_train([caches["sample"]], tmp_path / "b", student_config, ce_weight=1.0)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in a:  # same tokens, same order, CE only: the teacher's targets play no part
        torch.testing.assert_close(a[k], b[k])


def test_mixing_caches_with_weights(caches, student_config, tmp_path):
    from pipeline.train_data import CacheBatches

    other = tmp_path / "copy"
    shutil.copytree(caches["topk"], other)
    mixed = CacheBatches([(caches["topk"], 3.0), (str(other), 1.0)], batch_size=4, seed=0)
    first_rows = mixed.reader.cache_rows[0][1]
    rows = [r for g in mixed.groups for r in g]
    share = sum(r < first_rows for r in rows) / len(rows)
    assert abs(share - 0.75) < 0.02
    summary = run_train([f"{caches['topk']}:3", f"{other}:1"], tmp_path / "run", student_config)
    assert [c["weight"] for c in summary["caches"]] == [3.0, 1.0]


def test_padded_student_vocab_is_accepted(caches, tmp_path, capsys):
    GPT2Config(vocab_size=400, n_layer=1, n_embd=16, n_head=2, n_positions=64).save_pretrained(tmp_path / "big")
    train(TrainConfig(caches=[caches["topk"]], output=str(tmp_path / "run"), student=str(tmp_path / "big"),
                      max_steps=2))
    assert "student vocabulary 400 != teacher logits 384" in capsys.readouterr().out


def test_eval_json(caches, tiny_teacher, text_data):
    res = CliRunner().invoke(main, ["eval", tiny_teacher, text_data, "--cache", caches["topk"], "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["perplexity"] > 1 and out["tokens"] > 1000
    assert 0 <= out["kl_to_teacher"] < 1e-3  # the teacher against its own cache


# ---- bad input ---------------------------------------------------------------------------------------------------


def cli_train(*args):
    return CliRunner().invoke(main, ["train", *map(str, args), "--quiet", "--max-steps", "1"])


def test_incomplete_cache_refused(caches, student_config, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(caches["topk"], broken)
    os.unlink(broken / "manifest.json")
    assert_one_line_error(cli_train(broken, "-o", tmp_path / "run", "--student", student_config),
                          "is incomplete", "rerun the same command to resume")


def test_truncated_cache_refused(caches, student_config, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(caches["topk"], broken)
    shard = broken / "shards" / "part-000000.arrow"
    with open(shard, "r+b") as f:
        f.truncate(100)
    assert_one_line_error(cli_train(broken, "-o", tmp_path / "run", "--student", student_config),
                          "part-000000.arrow has 100 bytes")


def test_tokenizer_mismatch_refused(caches, tmp_path):
    from models import make_teacher

    other = make_teacher(str(tmp_path / "other"), vocab_size=300)
    assert_one_line_error(cli_train(caches["topk"], "-o", tmp_path / "run", "--student", other),
                          "tokenizer differs from the teacher's")


def test_student_vocab_too_small_refused(caches, tmp_path):
    GPT2Config(vocab_size=100, n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "small")
    assert_one_line_error(cli_train(caches["topk"], "-o", tmp_path / "run", "--student", tmp_path / "small"),
                          "output layer has 100 ids, fewer than the teacher's tokenizer (384)")


def test_mixed_teachers_refused(caches, student_config, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(caches["topk"], other)
    m = json.load(open(other / "manifest.json"))
    m["teacher"]["id"] = "someone-else"
    json.dump(m, open(other / "manifest.json", "w"))
    assert_one_line_error(cli_train(caches["topk"], other, "-o", tmp_path / "run", "--student", student_config),
                          "different teachers", "--allow-mixed-teachers")
    res = cli_train(caches["topk"], other, "-o", tmp_path / "run", "--student", student_config,
                    "--allow-mixed-teachers")
    assert res.exit_code == 0, res.output


def test_unknown_loss_and_bad_ce_weight_reported_together(caches, student_config, tmp_path):
    assert_one_line_error(cli_train(caches["topk"], "-o", tmp_path / "run", "--student", student_config,
                                    "--loss", "kl2", "--ce-weight", "1.5"),
                          "unknown loss 'kl2'", "--ce-weight 1.5 is outside [0, 1]")


def test_run_dir_holding_a_run(caches, student_config, tmp_path):
    assert cli_train(caches["topk"], "-o", tmp_path / "run", "--student", student_config).exit_code == 0
    assert_one_line_error(cli_train(caches["topk"], "-o", tmp_path / "run", "--student", student_config),
                          "already holds a run", "--resume", "--overwrite")
    res = cli_train(caches["topk"], "-o", tmp_path / "run", "--student", student_config, "--overwrite")
    assert res.exit_code == 0, res.output
    assert_one_line_error(cli_train(caches["topk"], "-o", tmp_path / "fresh", "--student", student_config,
                                    "--resume"), "holds no run to resume")


def test_trainer_args_file_and_flags_override(caches, student_config, tmp_path):
    (tmp_path / "args.yaml").write_text("learning_rate: 0.01\nlr_scheduler_type: constant\nmax_steps: 3\n")
    summary = train(TrainConfig(caches=[caches["topk"]], output=str(tmp_path / "run"), student=student_config,
                                trainer_args=str(tmp_path / "args.yaml"), max_steps=2, quiet=True))
    resolved = summary["config"]["resolved_training_args"]
    assert resolved["lr"] == 0.01 and resolved["max_steps"] == 2  # file, then the flag that was given
    (tmp_path / "bad.json").write_text('{"no_such_field": 1}')
    assert_one_line_error(cli_train(caches["topk"], "-o", tmp_path / "r2", "--student", student_config,
                                    "--trainer-args", tmp_path / "bad.json"), "--trainer-args", "no_such_field")


def test_dataloader_workers_read_the_same_batches(caches):
    from pipeline.train_data import CacheBatches, unwrap_batch

    data = CacheBatches([(caches["sample"], None)], batch_size=4, seed=1)
    plain = [data[i] for i in range(len(data))]
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=unwrap_batch, num_workers=2)
    for a, b in zip(plain, loader):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert sorted(r for g in data.groups for r in g) == list(range(data.reader.num_rows))
