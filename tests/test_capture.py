"""kdcache capture: parity with a live forward pass, sampling statistics, chunking, packing, chat, bad input."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.capture import CaptureConfig, capture
from pipeline.cli import main
from pipeline.runtime import plan_batches
from storage.format import CacheMismatchError
from storage.reader import CacheReader
from storage.verify import verify_cache


def run(teacher, data, out, **kw):
    return capture(CaptureConfig(teacher=teacher, data=data, output=str(out), quiet=True, **kw))


def all_rows(path):
    reader = CacheReader(str(path))
    return reader, reader.read_rows(np.arange(reader.num_rows))


def live_logprobs(teacher, ids):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.fixture(scope="module")
def topk_cache(tiny_teacher, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "topk"
    result = run(tiny_teacher, text_data, out, top_k=16, unit_rows=32)
    return out, result


def test_topk_equals_live_forward(tiny_teacher, topk_cache):
    out, _ = topk_cache
    reader, rows = all_rows(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    checked = 0
    for r in range(0, rows.num_rows, 9):
        row = rows.row(r)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.from_numpy(row["input_ids"].astype(np.int64))[None]).logits[0].float(), -1)
        want_v, want_i = lp.topk(16, dim=-1)
        np.testing.assert_allclose(row["topk_logprobs"].astype(np.float32), want_v.numpy(), atol=2e-3, rtol=2e-3)
        # ids agree except where two log-probs tie within fp16 precision
        same = row["topk_ids"].astype(np.int64) == want_i.numpy()
        assert same.mean() > 0.99
        checked += len(row["input_ids"])
    assert checked > 500
    assert verify_cache(str(out)) == []


def test_manifest_records_provenance(topk_cache, tiny_teacher, text_data):
    out, result = topk_cache
    m = json.load(open(out / "manifest.json"))
    assert m["teacher"]["id"] == tiny_teacher and len(m["teacher"]["config_fingerprint"]) == 64
    assert m["tokenizer"]["vocab_size"] == 384 and len(m["tokenizer"]["fingerprint"]) == 64
    assert m["dataset"]["source"] == text_data and m["dataset"]["fingerprint"]
    assert m["config"]["top_k"] == 16 and m["config"]["max_length"] == 64  # the teacher's context
    assert m["position_convention"].startswith("position t holds the teacher's distribution over token t+1")
    assert m["dataset"]["empty_rows"] == 1 and result.empty_rows == 1
    assert m["totals"]["tokens"] == result.tokens


def test_long_documents_are_chunked_none_lost(topk_cache, tiny_teacher, text_data):
    out, _ = topk_cache
    _, rows = all_rows(out)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    docs = [json.loads(line)["text"] for line in open(text_data)]
    by_doc = {}
    for r in range(rows.num_rows):
        row = rows.row(r)
        assert len(row["input_ids"]) <= 64
        by_doc.setdefault(row["seq_id"] >> 20, []).append((row["seq_id"] & 0xFFFFF, row["input_ids"]))
    assert any(len(v) > 1 for v in by_doc.values())  # some documents were longer than the context
    for doc, chunks in by_doc.items():
        joined = np.concatenate([ids for _, ids in sorted(chunks, key=lambda c: c[0])])
        np.testing.assert_array_equal(joined, tok(docs[doc])["input_ids"])
    assert len(by_doc) == len([d for d in docs if d.strip()])


def test_sampled_counts_sum_and_match_teacher(tiny_teacher, text_data, tmp_path):
    run(tiny_teacher, text_data, tmp_path / "s", mode="sample", draws=40, unit_rows=32, seed=3)
    assert verify_cache(str(tmp_path / "s")) == []
    reader, rows = all_rows(tmp_path / "s")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    est = np.zeros(384)
    want = np.zeros(384)
    var = np.zeros(384)
    for r in range(rows.num_rows):
        row = rows.row(r)
        with torch.no_grad():
            p = torch.softmax(model(torch.from_numpy(row["input_ids"].astype(np.int64))[None]).logits[0].float(), -1).numpy()
        for t, (ids, counts) in enumerate(zip(row["sample_ids"], row["sample_counts"])):
            assert counts.sum() == 40
            est[ids.astype(np.int64)] += counts / 40
        want += p.sum(0)
        var += (p * (1 - p)).sum(0) / 40
    # summed over ~5k positions the estimate of every id's probability is within 5 standard deviations
    z = np.abs(est - want) / np.sqrt(var + 1e-12)
    assert z.max() < 5, z.max()
    assert np.abs(est - want).sum() / want.sum() < 0.05


def test_sampling_is_seeded(tiny_teacher, text_data, tmp_path):
    run(tiny_teacher, text_data, tmp_path / "a", mode="sample", draws=10, limit=12, seed=1)
    run(tiny_teacher, text_data, tmp_path / "b", mode="sample", draws=10, limit=12, seed=1)
    run(tiny_teacher, text_data, tmp_path / "c", mode="sample", draws=10, limit=12, seed=2)
    a, b, c = (all_rows(tmp_path / x)[1] for x in "abc")
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    assert not np.array_equal(a.sample_counts, c.sample_counts) or not np.array_equal(a.sample_ids, c.sample_ids)


def test_packing_fills_rows(tiny_teacher, text_data, tmp_path):
    run(tiny_teacher, text_data, tmp_path / "p", pack=True, top_k=4, max_length=48)
    _, rows = all_rows(tmp_path / "p")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    lengths = rows.lengths
    assert (lengths == 48).sum() == len(lengths) - 1  # only the tail of the stream is short
    stream = np.concatenate([rows.row(r)["input_ids"] for r in np.argsort(rows.seq_id)])
    docs = [json.loads(line)["text"] for line in open(text_data)]
    want = [i for d in docs if d.strip() for i in tok(d)["input_ids"] + [tok.eos_token_id]]
    np.testing.assert_array_equal(stream, want)


def test_chat_rows_mask_everything_but_the_assistant(tiny_teacher, tmp_path):
    convs = [
        {"messages": [{"role": "user", "content": "What say you, my lord?"},
                      {"role": "assistant", "content": "I say the king is dead."}]},
        {"messages": [{"role": "system", "content": "Speak as Hamlet."}, {"role": "user", "content": "Who's there?"},
                      {"role": "assistant", "content": "Nay, answer me."}, {"role": "user", "content": "Long live"},
                      {"role": "assistant", "content": "the king!"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in convs))
    run(tiny_teacher, str(path), tmp_path / "c", top_k=4)
    reader, rows = all_rows(tmp_path / "c")
    assert reader.header.loss_mask
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    trained = {}
    for r in np.argsort(rows.seq_id):  # chunks of one conversation in order
        row = rows.row(r)
        trained.setdefault(row["seq_id"] >> 20, []).extend(row["input_ids"][row["loss_mask"] == 1].tolist())
    # the assistant's words and its end-of-turn marker (so the student learns to stop), nothing else
    assert [tok.decode(trained[k]) for k in sorted(trained)] == [
        "I say the king is dead.<|end|>\n", "Nay, answer me.<|end|>\nthe king!<|end|>\n"]


def test_length_bucketing_keeps_padding_small():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.5, 0.8, 2048).astype(int), 1, 2048)  # web-text-like spread, one unit
    batches = plan_batches(lengths, batch_tokens=16_384)
    assert sorted(np.concatenate(batches).tolist()) == list(range(2048))  # every row once
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert all(len(b) * lengths[b].max() <= 16_384 or len(b) == 1 for b in batches)
    assert 1 - lengths.sum() / padded < 0.02
    unsorted = sum(lengths[i : i + 8].max() * len(lengths[i : i + 8]) for i in range(0, 2048, 8))
    assert 1 - lengths.sum() / unsorted > 0.2  # what bucketing saves


def test_padding_fraction_is_reported(tiny_teacher, text_data, tmp_path):
    result = run(tiny_teacher, text_data, tmp_path / "b", top_k=4, batch_tokens=128)
    m = json.load(open(tmp_path / "b" / "manifest.json"))
    assert m["capture_stats"]["padding_fraction"] == round(result.padding_fraction, 5)
    assert 0 <= result.padding_fraction < 0.05


# ---- resume, rerun, overwrite ------------------------------------------------------------------------------------


def test_rerun_on_complete_cache_says_so(topk_cache, tiny_teacher, text_data):
    out, _ = topk_cache
    res = CliRunner().invoke(main, ["capture", tiny_teacher, text_data, "-o", str(out), "--top-k", "16",
                                    "--unit-rows", "32", "--quiet", "--batch-tokens", "999"])
    assert res.exit_code == 0 and "already complete" in res.output


def test_other_settings_refused_then_overwrite(tiny_teacher, text_data, tmp_path):
    out = tmp_path / "c"
    run(tiny_teacher, text_data, out, top_k=8, limit=10)
    res = CliRunner().invoke(main, ["capture", tiny_teacher, text_data, "-o", str(out), "--top-k", "4",
                                    "--limit", "10", "--quiet"])
    assert res.exit_code == 1 and "other settings" in res.output and "k: 8 != 4" in res.output
    assert "--overwrite" in res.output and verify_cache(str(out)) == []  # untouched
    with pytest.raises(CacheMismatchError, match="mode: 'topk' != 'sample'"):
        run(tiny_teacher, text_data, out, mode="sample", limit=10)
    run(tiny_teacher, text_data, out, top_k=4, limit=10, overwrite=True)
    assert CacheReader(str(out)).header.k == 4


# ---- bad input ---------------------------------------------------------------------------------------------------


def cli(*args):
    return CliRunner().invoke(main, ["capture", *map(str, args), "--quiet"])


def test_missing_teacher(text_data, tmp_path):
    assert_one_line_error(cli(tmp_path / "nope", text_data, "-o", tmp_path / "c"), "teacher path", "does not exist")


def test_missing_data(tiny_teacher, tmp_path):
    assert_one_line_error(cli(tiny_teacher, tmp_path / "nope.jsonl", "-o", tmp_path / "c"),
                          "data path", "does not exist")


def test_missing_text_field_names_columns(tiny_teacher, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "hi", "id": 1}\n')
    assert_one_line_error(cli(tiny_teacher, tmp_path / "d.jsonl", "-o", tmp_path / "c"),
                          "text field 'text' not in dataset; columns are: body, id", "--text-field")


def test_text_field_flag(tiny_teacher, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "To be or not to be", "id": 1}\n')
    res = cli(tiny_teacher, tmp_path / "d.jsonl", "-o", tmp_path / "c", "--text-field", "body")
    assert res.exit_code == 0 and CacheReader(str(tmp_path / "c")).num_rows == 1


def test_empty_dataset(tiny_teacher, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    assert_one_line_error(cli(tiny_teacher, tmp_path / "d.jsonl", "-o", tmp_path / "c"),
                          "has no non-empty rows (2 empty rows skipped)")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_topk_larger_than_vocab(tiny_teacher, text_data, tmp_path):
    assert_one_line_error(cli(tiny_teacher, text_data, "-o", tmp_path / "c", "--top-k", "1000"),
                          "--top-k 1000 is larger than the teacher's vocabulary (384)")


def test_max_length_beyond_context(tiny_teacher, text_data, tmp_path):
    assert_one_line_error(cli(tiny_teacher, text_data, "-o", tmp_path / "c", "--max-length", "100"),
                          "exceeds the teacher's context of 64 tokens")


def test_non_utf8_txt(tiny_teacher, tmp_path):
    (tmp_path / "d.txt").write_bytes("Thou art \xe9 knave".encode("latin-1"))
    assert_one_line_error(cli(tiny_teacher, tmp_path / "d.txt", "-o", tmp_path / "c"), "is not valid UTF-8", "iconv")


def test_txt_folder_one_row_per_document(tiny_teacher, tmp_path):
    folder = tmp_path / "plays"
    folder.mkdir()
    (folder / "a.txt").write_text("O Romeo, Romeo!\nWherefore art thou Romeo?\n")
    (folder / "b.txt").write_text("Now is the winter of our discontent.\n")
    res = cli(tiny_teacher, folder, "-o", tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert CacheReader(str(tmp_path / "c")).num_rows == 2


def test_bad_settings_reported_together(tiny_teacher, text_data, tmp_path):
    res = cli(tiny_teacher, text_data, "-o", tmp_path / "c", "--top-k", "0", "--draws", "999")
    assert_one_line_error(res, "--top-k 0 must be at least 1", "--draws 999 must be between 1 and 255")


def test_show_decodes_with_the_recorded_tokenizer(topk_cache, tiny_teacher):
    out, _ = topk_cache
    res = CliRunner().invoke(main, ["show", str(out), "--row", "0", "--top", "2", "--max-tokens", "5"])
    assert res.exit_code == 0, res.output
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert tok.pad_token is None  # the teacher has no pad token, and capture handled it
    first = CacheReader(str(out)).read_rows(np.array([0])).row(0)["input_ids"][0]
    assert repr(tok.decode([int(first)])) in res.output and "top-16 mass" in res.output
    assert "tokenizer not available" not in res.output


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_topk_parity_on_other_families(family, tiny_teacher, text_data, tmp_path):
    """Capture reads the final hidden states and applies the head itself: check it on a Llama (untied head) and a
    Gemma 2 (final logit soft-capping) too, against the models' own logits."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, head_dim=16)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, final_logit_softcapping=3.0))
    path = tmp_path / family
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(path)
    run(str(path), text_data, tmp_path / "c", top_k=8, limit=6)
    _, rows = all_rows(tmp_path / "c")
    model.eval()
    for r in range(rows.num_rows):
        row = rows.row(r)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.from_numpy(row["input_ids"].astype(np.int64))[None]).logits[0].float(), -1)
        np.testing.assert_allclose(row["topk_logprobs"].astype(np.float32), lp.topk(8, -1).values.numpy(),
                                   atol=2e-3, rtol=2e-3)
