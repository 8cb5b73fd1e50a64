"""Each way data can be bad raises DataError naming the file or field and the fix."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_train.data import (DataError, DistributedBatchSampler, ShardWriter, TokenDataset,
                             TokenShards, ensure_prepared, load_tokenizer, prepare, read_index,
                             verify_shards, write_index, write_shard)
from dist_train.data.shards import ShardIndex, ShardInfo, _sync_and_checksum


class FakeTokenizer:
    spec = "fake"
    fingerprint = "fake-v1"
    eos_id = 0
    vocab_size = 1000


@pytest.fixture
def shard_dir(tmp_path):
    """Three arrow shards of 100 tokens each."""
    d = tmp_path / "shards"
    w = ShardWriter(d, FakeTokenizer(), shard_tokens=100)
    w.add_tokens(np.arange(300, dtype=np.uint16) % 1000)
    w.close()
    return d


def test_truncated_shard(shard_dir):
    path = shard_dir / "shard-00001.arrow"
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match=r"shard-00001\.arrow is \d+ bytes but index\.json says") as e:
        TokenShards(shard_dir)
    assert "dist-train prepare" in str(e.value)


def test_garbage_shard_of_the_right_size(shard_dir):
    path = shard_dir / "shard-00002.arrow"
    size = path.stat().st_size
    path.write_bytes(b"\x13garbage" * (size // 8) + b"\0" * (size % 8))
    with pytest.raises(DataError, match=r"shard-00002\.arrow fails its checksum"):
        TokenShards(shard_dir)


def test_garbage_shard_with_a_matching_index(shard_dir):
    """Even if index.json agrees with the bytes, a non-Arrow file is named as such."""
    path = shard_dir / "shard-00000.arrow"
    path.write_bytes(b"not an arrow file at all" * 10)
    idx = read_index(shard_dir)
    size, crc, tail = _sync_and_checksum(path)
    info = ShardInfo(file=path.name, format="arrow", tokens=100, bytes=size, crc32=crc,
                     tail_crc32=tail)
    write_index(shard_dir, ShardIndex(**{**idx.__dict__, "shards": (info,) + idx.shards[1:]}))
    with pytest.raises(DataError, match=r"shard-00000\.arrow is not a readable arrow file"):
        TokenShards(shard_dir)


def test_missing_shard(shard_dir):
    (shard_dir / "shard-00001.arrow").unlink()
    with pytest.raises(DataError, match=r"shard-00001\.arrow listed in index\.json is missing"):
        TokenDataset(shard_dir, seq_len=8)


def test_wrong_dtype_shard(shard_dir):
    idx = read_index(shard_dir)
    info = write_shard(shard_dir / "shard-00000.arrow", np.arange(100, dtype=np.uint32))
    write_index(shard_dir, ShardIndex(**{**idx.__dict__, "shards": (info,) + idx.shards[1:]}))
    with pytest.raises(DataError, match=r"shard-00000\.arrow: column 'tokens' has type uint32 "
                                        r"but index\.json says uint16"):
        TokenShards(shard_dir)


def test_token_count_mismatch(shard_dir):
    idx = read_index(shard_dir)
    doc = json.loads((shard_dir / "index.json").read_text())
    doc["shards"][0]["tokens"] = 99
    (shard_dir / "index.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"shard-00000\.arrow holds 100 tokens but index\.json says 99"):
        TokenShards(shard_dir)
    assert idx.shards[0].tokens == 100


@pytest.mark.parametrize("content, message", [
    ("{not json", r"index\.json is not valid JSON"),
    ("[]", r"index\.json is not a dist-train token index"),
    (None, r"index\.json: missing key 'shards'"),
    ("wrongtype", r"index\.json: key 'vocab_size' should be a int"),
])
def test_bad_index_json(shard_dir, content, message):
    path = shard_dir / "index.json"
    doc = json.loads(path.read_text())
    if content is None:
        del doc["shards"]
        content = json.dumps(doc)
    elif content == "wrongtype":
        doc["vocab_size"] = "1000"
        content = json.dumps(doc)
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        TokenDataset(shard_dir, seq_len=8)
    assert str(path) in str(e.value) and "dist-train prepare" in str(e.value)


def test_no_index_json(tmp_path):
    with pytest.raises(DataError, match=r"has no index\.json.*dist-train prepare INPUT"):
        TokenShards(tmp_path)


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_token_id_out_of_range(tmp_path, fmt):
    d = tmp_path / "s"
    d.mkdir()
    info = write_shard(d / f"shard-00000.{fmt}", np.array([1, 2, 3, 1000, 5, 6], np.uint16), fmt)
    write_index(d, ShardIndex(tokenizer_spec="fake", tokenizer_fingerprint="fake-v1",
                              vocab_size=1000, eos_id=0, dtype="uint16", shards=(info,)))
    ds = TokenDataset(d, seq_len=2)
    ds[0]  # tokens 0..2 are in range
    with pytest.raises(DataError, match=rf"shard-00000\.{fmt}: token id 1000 at position 3 is "
                                        r">= vocab_size 1000"):
        ds[1]
    with pytest.raises(DataError, match=r"token id 1000 at position 3"):
        verify_shards(d)


def test_writer_rejects_ids_outside_the_tokenizer_vocab(tmp_path):
    w = ShardWriter(tmp_path / "s", FakeTokenizer())
    with pytest.raises(DataError, match=r"token id 1000 outside its vocab_size 1000"):
        w.add_tokens(np.array([5, 1000]))


def test_corpus_shorter_than_one_sample(shard_dir):
    with pytest.raises(DataError) as e:
        TokenDataset(shard_dir, seq_len=300)
    msg = str(e.value)
    assert str(shard_dir) in msg and "300 tokens" in msg and "data.seq_len + 1 = 301" in msg


def test_jsonl_line_without_text(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "ok"}\n\n{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl line 3: no 'text' field \(found \['body'\]\)"):
        prepare([f], tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["docs.jsonl"]


def test_jsonl_bad_json_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl line 2: not valid JSON"):
        prepare([f], tmp_path / "out")


def test_parquet_without_text_column(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(DataError, match=r"d\.parquet has no column 'text' \(columns: \['body'\]\)"):
        prepare([f], tmp_path / "out")


def test_binary_and_missing_inputs(tmp_path):
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match=r"b\.bin is not UTF-8 text"):
        prepare([tmp_path / "b.bin"], tmp_path / "out")
    with pytest.raises(DataError, match=r"input .*nope\.txt does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out")


def test_out_dir_not_empty(tmp_path, shard_dir):
    (tmp_path / "a.txt").write_text("hi")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.me").write_text("x")
    with pytest.raises(DataError, match=r"--out .*shards already exists.*--overwrite"):
        prepare([tmp_path / "a.txt"], shard_dir)
    with pytest.raises(DataError, match=r"--out .*other is not empty and holds no index\.json"):
        prepare([tmp_path / "a.txt"], other, overwrite=True)
    assert (other / "keep.me").exists()


def test_sampler_state_from_another_run():
    s = DistributedBatchSampler(100, global_batch=8, micro_batch=2, seed=1)
    s.next_step()
    state = s.state_dict()
    other_gb = DistributedBatchSampler(100, global_batch=16, micro_batch=2, seed=1)
    with pytest.raises(DataError, match=r"train\.global_batch = 8, this run has train\.global_batch = 16"):
        other_gb.load_state_dict(state)
    other_n = DistributedBatchSampler(120, global_batch=8, micro_batch=2, seed=1)
    with pytest.raises(DataError, match=r"dataset of 100 samples, this run's dataset has 120"):
        other_n.load_state_dict(state)
    other_seed = DistributedBatchSampler(100, global_batch=8, micro_batch=2, seed=2)
    with pytest.raises(DataError, match=r"seed 1 \(run\.seed\), this run has seed 2"):
        other_seed.load_state_dict(state)
    with pytest.raises(DataError, match=r"lacks \['epoch'"):
        other_seed.load_state_dict({"version": 1})


def test_sampler_batch_sizes_must_divide():
    with pytest.raises(DataError, match=r"train\.global_batch = 10 is not divisible by the "
                                        r"data-parallel size 4 \(parallel\.dp_replicate x "
                                        r"parallel\.dp_shard\).*e\.g\. 12"):
        DistributedBatchSampler(100, global_batch=10, micro_batch=1, dp_size=4)
    with pytest.raises(DataError, match=r"12 / 2 = 6 samples, which is not divisible by "
                                        r"train\.micro_batch = 4.*divisor of 6"):
        DistributedBatchSampler(100, global_batch=12, micro_batch=4, dp_size=2)
    with pytest.raises(DataError, match=r"dataset has 5 samples .* fewer than train\.global_batch = 8"):
        DistributedBatchSampler(5, global_batch=8, micro_batch=1)


def test_bad_tokenizer_specs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"tokenizer file .*missing\.json does not exist.*\"byte\""):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"hello": "world"}')
    pytest.importorskip("tokenizers")
    with pytest.raises(DataError, match=r"tokenizer\.json is not a Hugging Face tokenizer\.json"):
        load_tokenizer(str(bad))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"tokenizer\.json: reading a tokenizer\.json needs the "
                                        r"`tokenizers` package"):
        load_tokenizer(str(bad))


def test_bad_data_source(tmp_path, shard_dir):
    with pytest.raises(DataError, match=r"data\.source = '.*nowhere' is neither \"bundled\""):
        ensure_prepared(str(tmp_path / "nowhere"), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data\.source = '.*empty' is a directory without index\.json"):
        ensure_prepared(str(tmp_path / "empty"), tmp_path / "cache")
    with pytest.raises(DataError, match=r"was prepared with tokenizer 'fake' but data\.tokenizer = "
                                        r"'byte' is a different tokenizer"):
        ensure_prepared(shard_dir, tmp_path / "cache", "byte")
    assert ensure_prepared(shard_dir, tmp_path / "cache", None) == shard_dir


def test_bad_seq_len(shard_dir):
    with pytest.raises(DataError, match=r"data\.seq_len must be a positive integer, got 0"):
        TokenDataset(shard_dir, seq_len=0)


# --- a prepare that finds no text publishes nothing ---------------------------------------

def _good_shards(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} has some words"}) + "\n" for i in range(40)))
    out = tmp_path / "S"
    prepare([docs], out)
    return docs, out, {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("content,name", [
    ("", "empty.txt"),                                   # an empty file
    ("\n\n   \n", "blank.jsonl"),                        # only empty lines
    ('{"text": ""}\n{"text": ""}\n', "empty-records.jsonl"),  # every record's text empty
])
def test_prepare_without_text_keeps_what_out_held(tmp_path, content, name):
    _, out, before = _good_shards(tmp_path)
    bad = tmp_path / name
    bad.write_text(content)
    with pytest.raises(DataError, match=rf"input {bad} holds no text.*nothing was written to {out}"):
        prepare([bad], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a named input without text is refused even beside good ones
    docs = tmp_path / "docs.jsonl"
    with pytest.raises(DataError, match=f"input {bad} holds no text"):
        prepare([docs, bad], tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_prepare_of_a_folder_without_text_and_one_with_an_empty_file(tmp_path):
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "a.txt").write_text("")
    with pytest.raises(DataError, match="hold no text: 0 documents to write"):
        prepare([empty_dir], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("")
    (mixed / "b.txt").write_text("some text")
    res = prepare([mixed], tmp_path / "out")
    assert res.documents == 1 and res.skipped_files == (str(mixed / "a.txt"),)
    assert "skipped 1 file(s) without text" in res.summary()


def test_prepare_command_prints_a_summary_not_a_repr(tmp_path):
    from tests.conftest import run_cli

    docs, _, _ = _good_shards(tmp_path)
    proc = run_cli("prepare", str(docs), "--out", str(tmp_path / "T"), "--verify")
    assert "PrepareResult" not in proc.stdout
    assert "prepared 40 documents" in proc.stdout and "tokens in 1 shard(s)" in proc.stdout
    assert str(tmp_path / "T") in proc.stdout and "CRC32 checked" in proc.stdout
    (tmp_path / "e.txt").write_text("")
    proc = run_cli("prepare", str(tmp_path / "e.txt"), "--out", str(tmp_path / "T"), "--overwrite", check=False)
    assert proc.returncode == 2 and "holds no text" in proc.stderr and "Traceback" not in proc.stderr
    assert read_index(tmp_path / "T").documents == 40


# --- full checks: `dist-train verify`, and a run that meets a damaged shard -------------

def _overwrite_middle(path):
    """A same-size overwrite in the middle of a file: its size and last 64 KiB are intact."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_a_damaged_shard_and_passes_good_ones(tmp_path):
    from tests.conftest import run_cli

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "words and more words " * 2000 + str(i)}) + "\n" for i in range(20)))
    run_cli("prepare", str(docs), "--out", str(tmp_path / "S"))
    ok = run_cli("verify", str(tmp_path / "S"))
    assert ok.stdout.startswith("ok ") and "every CRC32 and token id checked" in ok.stdout
    _overwrite_middle(tmp_path / "S" / "shard-00000.arrow")
    TokenShards(tmp_path / "S")  # the cheap checks at open do not see it ...
    bad = run_cli("verify", str(tmp_path / "S"), check=False)  # ... the full check does
    assert bad.returncode == 2 and "BAD" in bad.stdout and "shard-00000.arrow fails its checksum" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli("verify", str(tmp_path / "nothing"), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
