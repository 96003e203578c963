"""kdcache generate: greedy parity with model.generate, distributions along the generated tokens, samples, EOS,
resume, and the trainer on a generated cache."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.generate import GenerateConfig, generate
from storage.reader import CacheReader
from storage.verify import verify_cache


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from models import shakespeare_lines

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": line}) for line in shakespeare_lines(9, offset=50)))
    return str(path)


def run(teacher, prompts, out, **kw):
    kw.setdefault("max_new_tokens", 10)
    return generate(GenerateConfig(teacher=teacher, prompts=prompts, output=str(out), quiet=True, **kw))


def rows_of(path):
    reader = CacheReader(str(path))
    rows = reader.read_rows(np.arange(reader.num_rows))
    return [rows.row(r) for r in np.argsort(rows.seq_id)]


def test_greedy_equals_hf_generate_and_distributions_equal_a_live_forward(tiny_teacher, prompts, tmp_path):
    run(tiny_teacher, prompts, tmp_path / "g", greedy=True, top_k=8, batch_size=4)
    assert verify_cache(str(tmp_path / "g")) == []
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    texts = [json.loads(line)["text"] for line in open(prompts)]
    for row, text in zip(rows_of(tmp_path / "g"), texts):
        prompt = tok(text)["input_ids"]
        p = row["prompt_len"]
        assert p == len(prompt) and list(row["input_ids"][:p]) == prompt
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                  pad_token_id=tok.eos_token_id)[0, p:]
            lp = torch.log_softmax(model(torch.from_numpy(row["input_ids"].astype(np.int64))[None]).logits[0], -1)
        np.testing.assert_array_equal(row["input_ids"][p:], want.numpy()[: len(row["input_ids"]) - p])
        assert row["text"] == tok.decode(row["input_ids"][p:], skip_special_tokens=True)
        n = len(row["input_ids"])
        np.testing.assert_allclose(row["topk_logprobs"][p - 1 : n - 1].astype(np.float32),
                                   lp[p - 1 : n - 1].topk(8, -1).values.numpy(), atol=2e-3, rtol=2e-3)
        assert np.all(np.isneginf(row["topk_logprobs"][: p - 1].astype(np.float32)))  # prompt: none stored
        assert np.all(np.isneginf(row["topk_logprobs"][n - 1].astype(np.float32)))


def test_two_samples_per_prompt_and_sampled_mode(tiny_teacher, prompts, tmp_path):
    run(tiny_teacher, prompts, tmp_path / "s", num_samples=2, mode="sample", draws=12, seed=5)
    assert verify_cache(str(tmp_path / "s")) == []
    rows = rows_of(tmp_path / "s")
    assert len(rows) == 18
    assert [r["seq_id"] & 1 for r in rows[:4]] == [0, 1, 0, 1]
    pairs = [(rows[i]["input_ids"], rows[i + 1]["input_ids"]) for i in range(0, 18, 2)]
    assert any(not np.array_equal(a, b) for a, b in pairs)  # sampled continuations differ
    r = rows[0]
    counts = [c.sum() for c in r["sample_counts"]]
    p, n = r["prompt_len"], len(r["input_ids"])
    assert all(c == 12 for c in counts[p - 1 : n - 1]) and all(c == 0 for c in counts[: p - 1])


def test_eos_ends_a_sequence(tiny_teacher, prompts, tmp_path):
    # make the token that greedy decoding emits third for the first prompt the EOS token
    run(tiny_teacher, prompts, tmp_path / "a", greedy=True, limit=1)
    first = rows_of(tmp_path / "a")[0]
    stop = int(first["input_ids"][first["prompt_len"] + 2])
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    tok.save_pretrained(teacher)
    run(str(teacher), prompts, tmp_path / "b", greedy=True, limit=1)
    row = rows_of(tmp_path / "b")[0]
    assert len(row["input_ids"]) - row["prompt_len"] == 3 and row["input_ids"][-1] == stop


def test_resume_generates_the_same_sequences(tiny_teacher, prompts, tmp_path):
    args = dict(unit_rows=3, batch_size=2, temperature=1.3, num_samples=2, seed=11)
    run(tiny_teacher, prompts, tmp_path / "full", **args)
    run(tiny_teacher, prompts, tmp_path / "cut", **args)
    # as if the run had died after its first unit: drop the manifest and the later commits and shards
    os.unlink(tmp_path / "cut" / "manifest.json")
    for unit in (1, 2):
        os.unlink(tmp_path / "cut" / "commits" / f"part-00000{unit}.arrow.json")
        os.unlink(tmp_path / "cut" / "shards" / f"part-00000{unit}.arrow")
    run(tiny_teacher, prompts, tmp_path / "cut", **args)
    for a, b in zip(rows_of(tmp_path / "full"), rows_of(tmp_path / "cut")):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["topk_logprobs"], b["topk_logprobs"])


def test_trainer_masks_prompt_tokens(tiny_teacher, prompts, student_config, tmp_path):
    from pipeline.train import TrainConfig, train

    run(tiny_teacher, prompts, tmp_path / "g", top_k=8)
    reader = CacheReader(str(tmp_path / "g"))
    batch = reader.read_padded(np.arange(reader.num_rows))
    for b in range(reader.num_rows):
        row = reader.read_rows(np.array([b])).row(0)
        p, n = row["prompt_len"], len(row["input_ids"])
        want = np.zeros(batch["target_mask"].shape[1], dtype=bool)
        want[p - 1 : n - 1] = True  # exactly the positions that predict generated tokens
        np.testing.assert_array_equal(batch["target_mask"][b], want)
    summary = train(TrainConfig(caches=[str(tmp_path / "g")], output=str(tmp_path / "run"), student=student_config,
                                max_steps=2, quiet=True))
    assert np.isfinite(summary["final_metrics"]["train_loss"])


def test_bad_generate_settings(tiny_teacher, prompts, tmp_path):
    with pytest.raises(ValueError, match="--num-samples 3 exceeds --num-beams 2"):
        run(tiny_teacher, prompts, tmp_path / "x", num_beams=2, num_samples=3)
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        run(tiny_teacher, prompts, tmp_path / "x", max_new_tokens=64)
    with pytest.raises(ValueError, match="prompt field 'text' not in dataset; columns are: body"):
        (tmp_path / "p.jsonl").write_text('{"body": "x"}\n')
        run(tiny_teacher, str(tmp_path / "p.jsonl"), tmp_path / "y")


def test_beam_search_rows_verify(tiny_teacher, prompts, tmp_path):
    run(tiny_teacher, prompts, tmp_path / "b", num_beams=3, num_samples=2, top_k=4, limit=4)
    assert verify_cache(str(tmp_path / "b")) == []
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    row = rows_of(tmp_path / "b")[1]
    p, n = row["prompt_len"], len(row["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.from_numpy(row["input_ids"].astype(np.int64))[None]).logits[0], -1)
    np.testing.assert_allclose(row["topk_logprobs"][p - 1 : n - 1].astype(np.float32),
                               lp[p - 1 : n - 1].topk(4, -1).values.numpy(), atol=2e-3, rtol=2e-3)
