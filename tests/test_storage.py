"""Round trips, order, splits and every rejection of the storage layer."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import write_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rowgen import random_rows

from pipeline.cli import main
from storage.format import CacheFormatError, CacheHeader, CacheLockedError, CacheMismatchError
from storage.reader import CacheReader, ReadPosition, epoch_order, iter_batches, split_order
from storage.verify import verify_cache
from storage.writer import CacheWriter


def assert_rows_equal(a, b):
    assert a.num_rows == b.num_rows
    for r in range(a.num_rows):
        x, y = a.row(r), b.row(r)
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], list):
                assert len(x[key]) == len(y[key])
                assert all(np.array_equal(p, q) for p, q in zip(x[key], y[key])), key
            elif isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype or key.startswith(("topk_ids", "sample_ids")), key
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
            else:
                assert x[key] == y[key], key


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["topk", "sample"]),
    vocab=st.sampled_from([7, 65_536, 65_537, 131_073, 262_144]),
    k=st.integers(1, 6),
    lengths=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4), min_size=1, max_size=3),
    loss_mask=st.booleans(),
    text=st.booleans(),
)
def test_round_trip(tmp_path_factory, mode, vocab, k, lengths, loss_mask, text):
    header = CacheHeader(mode=mode, vocab_size=vocab, k=min(k, vocab) if mode == "topk" else None,
                         draws=5 * k if mode == "sample" else None, loss_mask=loss_mask, text=text)
    path = tmp_path_factory.mktemp("rt") / "cache"
    written = write_cache(path, header, lengths)
    reader = CacheReader(str(path))
    assert reader.num_rows == sum(len(x) for x in lengths)
    assert verify_cache(str(path)) == []
    start = 0
    for rows in written:
        got = reader.read_rows(np.arange(start, start + rows.num_rows))
        assert_rows_equal(got, rows)
        start += rows.num_rows
    # ids use the narrowest type and the largest id survives exactly
    id_col = "topk_ids" if mode == "topk" else "sample_ids"
    shard = pa.ipc.open_file(str(path / "shards" / "part-000000.arrow")).read_all()
    want = pa.uint16() if vocab <= 65_536 else pa.uint32()
    assert shard.schema.field(id_col).type.value_type.value_type == want


def test_read_rows_any_order_equals_per_row(small_cache):
    reader = CacheReader(small_cache)
    idx = np.array([8, 0, 3, 3, 5])
    batch = reader.read_rows(idx)
    for j, i in enumerate(idx):
        one = reader.read_rows(np.array([i]))
        assert batch.row(j)["seq_id"] == one.row(0)["seq_id"] == i
        np.testing.assert_array_equal(batch.row(j)["topk_logprobs"], one.row(0)["topk_logprobs"])
        np.testing.assert_array_equal(batch.row(j)["input_ids"], one.row(0)["input_ids"])


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = epoch_order(1000, seed=3, epoch=1), epoch_order(1000, seed=3, epoch=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, epoch_order(1000, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(1000, seed=4, epoch=1))
    assert sorted(a.tolist()) == list(range(1000))


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (4, 2)])
def test_splits_cover_every_row_once(world, workers):
    order = epoch_order(101, seed=0, epoch=0)
    shares = [split_order(order, r, world, w, workers) for r in range(world) for w in range(workers)]
    merged = np.concatenate(shares)
    assert len(merged) == 101 and len(np.unique(merged)) == 101
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_resume_position_gives_the_rest_of_the_epoch(small_cache):
    reader = CacheReader(small_cache)
    full = [b.seq_id for b in iter_batches(reader, 2, ReadPosition(seed=1, epoch=0, rows_seen=0))]
    rest = [b.seq_id for b in iter_batches(reader, 2, ReadPosition(seed=1, epoch=0, rows_seen=4))]
    assert len(full) == 5 and len(rest) == 3
    for x, y in zip(full[2:], rest):
        np.testing.assert_array_equal(x, y)


def test_several_caches_read_as_one(tmp_path, topk_header):
    write_cache(tmp_path / "a", topk_header, [[3, 4]], seed=1)
    b_rows = write_cache(tmp_path / "b", topk_header, [[2, 2, 2]], seed=2)
    reader = CacheReader([str(tmp_path / "a"), str(tmp_path / "b")])
    assert reader.num_rows == 5 and reader.cache_rows == [(0, 2), (2, 5)]
    assert_rows_equal(reader.read_rows(np.arange(2, 5)), b_rows[0])


def test_mixing_caches_of_different_teachers_is_refused(tmp_path, topk_header):
    write_cache(tmp_path / "a", topk_header, [[3]])
    other = CacheHeader(**{**topk_header.__dict__, "teacher": {"id": "other"}})
    write_cache(tmp_path / "b", other, [[3]])
    with pytest.raises(CacheMismatchError, match="different teachers.*--allow-mixed-teachers"):
        CacheReader([str(tmp_path / "a"), str(tmp_path / "b")])
    assert CacheReader([str(tmp_path / "a"), str(tmp_path / "b")], allow_mixed_teachers=True).num_rows == 2


def test_mixing_modes_is_refused(tmp_path, topk_header, sample_header):
    write_cache(tmp_path / "a", topk_header, [[3]])
    write_cache(tmp_path / "b", sample_header, [[3]])
    with pytest.raises(CacheMismatchError, match="cannot be read together: mode"):
        CacheReader([str(tmp_path / "a"), str(tmp_path / "b")])


def test_implied_loss_mask_when_mixing_chat_and_plain(tmp_path, topk_header):
    chat = CacheHeader(**{**topk_header.__dict__, "loss_mask": True})
    write_cache(tmp_path / "chat", chat, [[4]])
    plain = write_cache(tmp_path / "plain", topk_header, [[5]])
    reader = CacheReader([str(tmp_path / "chat"), str(tmp_path / "plain")])
    row = reader.read_rows(np.array([1])).row(0)
    p = plain[0].prompt_len[0]
    np.testing.assert_array_equal(row["loss_mask"], (np.arange(5) >= p).astype(np.uint8))


# ---- crash safety and writers ------------------------------------------------------------------------------------


def test_failed_shard_leaves_nothing_and_resume_skips_committed(tmp_path, topk_header):
    path = str(tmp_path / "c")
    with CacheWriter(path, topk_header) as w:
        with w.shard(0) as s:
            s.write(random_rows(topk_header, [3, 3]))
        with pytest.raises(RuntimeError):
            with w.shard(1) as s:
                s.write(random_rows(topk_header, [2], first_seq_id=2))
                raise RuntimeError("teacher died")
    assert sorted(os.listdir(os.path.join(path, "shards"))) == ["part-000000.arrow"]
    with pytest.raises(CacheFormatError, match="incomplete.*rerun the same command to resume"):
        CacheReader(path)
    with CacheWriter(path, topk_header) as w:
        assert w.committed_units() == [0]
        with w.shard(1) as s:
            s.write(random_rows(topk_header, [2], first_seq_id=2))
        w.finalize(expected_units=[0, 1])
    assert CacheReader(path).num_rows == 3 and verify_cache(path) == []


def test_shard_without_commit_record_is_redone(tmp_path, topk_header):
    path = str(tmp_path / "c")
    with CacheWriter(path, topk_header) as w:
        with w.shard(0) as s:
            s.write(random_rows(topk_header, [3]))
    os.unlink(os.path.join(path, "commits", "part-000000.arrow.json"))  # killed between rename and commit
    with CacheWriter(path, topk_header) as w:
        assert w.committed_units() == []


def test_finalize_refuses_missing_units(tmp_path, topk_header):
    with CacheWriter(str(tmp_path / "c"), topk_header) as w:
        with w.shard(0) as s:
            s.write(random_rows(topk_header, [3]))
        with pytest.raises(CacheFormatError, match=r"work units \[1\] are not committed"):
            w.finalize(expected_units=[0, 1])


def test_second_writer_is_refused(tmp_path, topk_header):
    path = str(tmp_path / "c")
    with CacheWriter(path, topk_header):
        with pytest.raises(CacheLockedError, match="being written by another process"):
            CacheWriter(path, topk_header)
    CacheWriter(path, topk_header).close()  # free again once the first has closed


def test_resume_with_other_settings_is_refused_and_overwrite_allows(tmp_path, topk_header):
    path = str(tmp_path / "c")
    write_cache(path, topk_header, [[2]])
    other = CacheHeader(**{**topk_header.__dict__, "k": 4})
    with pytest.raises(CacheMismatchError, match=r"other settings \(k: 8 != 4\).*--overwrite"):
        CacheWriter(path, other)
    assert CacheReader(path).header.k == 8  # untouched
    with CacheWriter(path, other, overwrite=True) as w:
        assert w.committed_units() == [] and not w.already_complete


def test_complete_cache_reports_complete(small_cache, topk_header):
    with CacheWriter(small_cache, topk_header) as w:
        assert w.already_complete


def test_non_empty_foreign_directory_is_refused(tmp_path, topk_header):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not empty and holds no kdcache header"):
        CacheWriter(str(tmp_path), topk_header)


# ---- rejections by the reader and by verify ----------------------------------------------------------------------


def test_missing_manifest(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(CacheFormatError, match="not a kdcache cache: manifest.json is missing"):
        CacheReader(str(tmp_path / "c"))


def test_unknown_format_version(small_cache):
    mpath = os.path.join(small_cache, "manifest.json")
    m = json.load(open(mpath))
    m["format_version"] = 99
    json.dump(m, open(mpath, "w"))
    with pytest.raises(CacheFormatError, match="format version 99, this kdcache reads version 1"):
        CacheReader(small_cache)


def test_truncated_shard(small_cache):
    shard = os.path.join(small_cache, "shards", "part-000001.arrow")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(CacheFormatError, match="part-000001.arrow has .* bytes, the manifest says"):
        CacheReader(small_cache)
    assert any("part-000001.arrow" in f and "truncated" in f for f in verify_cache(small_cache))


def test_missing_shard(small_cache):
    os.unlink(os.path.join(small_cache, "shards", "part-000002.arrow"))
    with pytest.raises(CacheFormatError, match="shard shards/part-000002.arrow is missing"):
        CacheReader(small_cache)
    assert verify_cache(small_cache) == ["shards/part-000002.arrow: missing"]


def test_flipped_byte_is_found_by_verify_and_hash_check(small_cache):
    shard = os.path.join(small_cache, "shards", "part-000000.arrow")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    assert verify_cache(small_cache) == ["shards/part-000000.arrow: sha256 differs from the manifest (corrupt)"]
    with pytest.raises(CacheFormatError, match="part-000000.arrow fails its sha256 check"):
        CacheReader(small_cache, check="hash")


def test_schema_different_from_manifest(tmp_path, topk_header):
    path = tmp_path / "c"
    write_cache(path, topk_header, [[3]])
    m = json.load(open(path / "manifest.json"))
    m["k"] = 4  # the manifest now claims k=4, the shard holds k=8
    json.dump(m, open(path / "manifest.json", "w"))
    with pytest.raises(CacheFormatError, match="schema different from the manifest"):
        CacheReader(str(path))
    assert verify_cache(str(path)) == ["shards/part-000000.arrow: schema differs from the manifest's"]


def test_verify_finds_broken_invariants(tmp_path, topk_header):
    rows = random_rows(topk_header, [4])
    rows.topk_logprobs = rows.topk_logprobs[:, ::-1].copy()  # ascending: unsorted
    rows.topk_ids[0, 0] = 299
    path = str(tmp_path / "c")
    with CacheWriter(path, topk_header) as w:
        with w.shard(0) as s:
            s.write(rows)
        w.finalize()
    faults = verify_cache(path)
    assert faults == ["shards/part-000000.arrow: top-k log-probs not sorted in descending order"]


def test_verify_finds_bad_counts(tmp_path, sample_header):
    rows = random_rows(sample_header, [3])
    rows.sample_counts[0] += 1
    path = str(tmp_path / "c")
    with CacheWriter(path, sample_header) as w:
        with w.shard(0) as s:
            s.write(rows)
        w.finalize()
    assert verify_cache(path) == ["shards/part-000000.arrow: sample counts do not sum to N=20 at every position"]


# ---- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_inspect_verify_show(small_cache):
    runner = CliRunner()
    out = runner.invoke(main, ["inspect", small_cache, "--json"])
    assert out.exit_code == 0
    summary = json.loads(out.output)
    assert summary["rows"] == 9 and summary["tokens"] == 34 and summary["k"] == 8 and len(summary["shards"]) == 3
    out = runner.invoke(main, ["verify", small_cache])
    assert out.exit_code == 0 and "OK" in out.output
    out = runner.invoke(main, ["show", small_cache, "--row", "1", "--top", "3"])
    assert out.exit_code == 0 and "top-8 mass" in out.output and "tokens 3" in out.output


def test_cli_errors_are_one_line(small_cache, tmp_path):
    runner = CliRunner()
    os.unlink(os.path.join(small_cache, "shards", "part-000000.arrow"))
    out = runner.invoke(main, ["verify", small_cache])
    assert out.exit_code == 1 and "FAULT shards/part-000000.arrow: missing" in out.output
    out = runner.invoke(main, ["inspect", str(tmp_path / "nope")])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and "does not exist" in out.output
    out = runner.invoke(main, ["show", small_cache, "--row", "0"])
    assert out.exit_code == 1 and "part-000000.arrow is missing" in out.output and "Traceback" not in out.output


def test_readme_pyarrow_snippet_runs(small_cache):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    snippet = readme.split("<!-- pyarrow-snippet -->")[1].split("```python")[1].split("```")[0]
    scope = {"CACHE": small_cache}
    exec(snippet, scope)
    assert scope["table"].num_rows == 4  # the first shard of the fixture


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_read_padded_matches_rows(tmp_path, topk_header, sample_header, mode):
    header = topk_header if mode == "topk" else sample_header
    write_cache(tmp_path / "c", header, [[5, 1, 7], [3, 4]])
    reader = CacheReader(str(tmp_path / "c"))
    idx = np.array([4, 0, 2, 1])
    batch = reader.read_padded(idx, pad_id=9, pad_to_multiple=8)
    B, L = batch["input_ids"].shape
    assert (B, L) == (4, 8)
    flat_at = 0
    for b, i in enumerate(idx):
        row = reader.read_rows(np.array([i])).row(0)
        n, p = len(row["input_ids"]), row["prompt_len"]
        np.testing.assert_array_equal(batch["input_ids"][b, :n], row["input_ids"])
        assert np.all(batch["input_ids"][b, n:] == 9)
        np.testing.assert_array_equal(batch["attention_mask"][b], np.arange(L) < n)
        # position t is trained on when token t+1 is a target: after the prompt and inside the row
        want = (np.arange(L) + 1 >= p) & (np.arange(L) + 1 < n)
        np.testing.assert_array_equal(batch["target_mask"][b], want)
        if mode == "topk":
            np.testing.assert_array_equal(batch["topk_ids"][b, :n], row["topk_ids"])
            np.testing.assert_array_equal(batch["topk_logprobs"][b, :n], row["topk_logprobs"])
            assert np.all(np.isneginf(batch["topk_logprobs"][b, n:]))
        else:
            per_pos = [len(x) for x in row["sample_ids"]]
            np.testing.assert_array_equal(batch["sample_n"][b, :n], per_pos)
            assert np.all(batch["sample_n"][b, n:] == 0)
            got = batch["sample_ids"][flat_at : flat_at + sum(per_pos)]
            np.testing.assert_array_equal(got, np.concatenate(row["sample_ids"]))
            np.testing.assert_array_equal(batch["sample_counts"][flat_at : flat_at + sum(per_pos)],
                                          np.concatenate(row["sample_counts"]))
            flat_at += sum(per_pos)


def test_read_padded_uses_chat_loss_mask(tmp_path, topk_header):
    chat = CacheHeader(**{**topk_header.__dict__, "loss_mask": True})
    rows = write_cache(tmp_path / "c", chat, [[6]])[0]
    batch = CacheReader(str(tmp_path / "c")).read_padded(np.array([0]))
    np.testing.assert_array_equal(batch["target_mask"][0, :5], rows.loss_mask[1:].astype(bool))
    assert not batch["target_mask"][0, 5]


def _checksum(path):
    reader = CacheReader(path)
    rows = reader.read_rows(np.arange(reader.num_rows))
    return int(rows.input_ids.sum()), float(rows.topk_logprobs.astype(np.float64).sum())


def test_many_processes_read_one_cache(small_cache):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_checksum, [small_cache] * 4)
    assert results == [_checksum(small_cache)] * 4


def test_verify_requires_distributions_where_the_loss_needs_them(tmp_path, topk_header):
    rows = random_rows(topk_header, [4, 4])
    rows.prompt_len[:] = [0, 2]
    rows.topk_logprobs[5] = -np.inf  # row 1, position 1 = prompt_len - 1: the first generated token's distribution
    rows.topk_logprobs[4] = -np.inf  # row 1, position 0: inside the prompt, may be absent
    path = str(tmp_path / "c")
    with CacheWriter(path, topk_header) as w:
        with w.shard(0) as s:
            s.write(rows)
        w.finalize()
    assert verify_cache(path) == ["shards/part-000000.arrow: positions that must hold a teacher distribution hold none"]
