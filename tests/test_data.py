"""dist_train.data: tokenizers, shards, prepare, dataset and sampler behave as documented."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dist_train.data import (ByteTokenizer, DistributedBatchSampler, ShardWriter, TokenDataset,
                             TokenShards, ensure_prepared, iter_bundled_files, load_tokenizer,
                             prepare, prepare_bundled, prepare_command, read_index, read_shard,
                             verify_shards)

prepare_mod = importlib.import_module("dist_train.data.prepare")
REPO = Path(__file__).resolve().parents[1]
SMALL_BUNDLE = 300_000


class FakeTokenizer:
    """A tokenizer with an arbitrary vocabulary size, for writing known token streams."""

    spec = "fake"
    fingerprint = "fake-v1"

    def __init__(self, vocab_size: int = 1000, eos_id: int = 0):
        self._vocab = vocab_size
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self._vocab


def write_stream(out_dir: Path, tokens: np.ndarray, vocab_size: int = 1000,
                 shard_tokens: int = 100, fmt: str = "arrow") -> Path:
    w = ShardWriter(out_dir, FakeTokenizer(vocab_size), shard_tokens=shard_tokens, fmt=fmt)
    w.add_tokens(tokens)
    w.close()
    return out_dir


# --- tokenizers ------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_non_ascii():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    text = "héllo wörld — 日本語 🚀\n\ttab"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids
    assert tok.vocab_size == 258 and tok.eos_id == 256
    assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode([104, tok.eos_id, 105], skip_special=False) == "h<|eos|>i"


def test_hf_tokenizer_round_trip(tmp_path, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps", "héllo wörld"] * 20
    hf.train_from_iterator(corpus, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))

    tok = load_tokenizer(str(path))
    assert tok.eos_id == hf.token_to_id("<|endoftext|>")
    assert tok.vocab_size == hf.get_vocab_size()
    for text in ["def add(a, b):\n    return a + b\n", "héllo wörld 🚀"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_array(text).tolist() == ids
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges apply

    # and it prepares shards whose index names it
    (tmp_path / "a.txt").write_text("the quick brown fox\n")
    prepare([tmp_path / "a.txt"], tmp_path / "shards", str(path))
    idx = read_index(tmp_path / "shards")
    assert idx.tokenizer_spec == str(path.resolve()) and idx.eos_id == tok.eos_id
    assert ensure_prepared(tmp_path / "shards", tmp_path / "cache", str(path)) == tmp_path / "shards"


# --- shards ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_shard_round_trip_across_shards(tmp_path, fmt):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, size=1234).astype(np.uint16)
    write_stream(tmp_path / "s", tokens, shard_tokens=100, fmt=fmt)
    idx = read_index(tmp_path / "s")
    assert len(idx.shards) == 13 and idx.total_tokens == 1234 and idx.dtype == "uint16"
    assert all(s.file.endswith("." + fmt) for s in idx.shards)
    shards = TokenShards(tmp_path / "s")
    assert np.array_equal(np.concatenate(shards.arrays), tokens)
    assert np.array_equal(shards.read(95, 305), tokens[95:305])  # spans three shards
    verify_shards(tmp_path / "s")
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_uint32_shards_for_large_vocab(tmp_path):
    tokens = np.array([0, 65535, 65536, 99_999], dtype=np.uint32)
    write_stream(tmp_path / "s", tokens, vocab_size=100_000)
    shards = TokenShards(tmp_path / "s")
    assert shards.index.dtype == "uint32" and shards.arrays[0].dtype == np.uint32
    assert shards.read(0, 4).tolist() == tokens.tolist()


def test_arrow_shard_is_zero_copy_memory_map(tmp_path):
    tokens = np.arange(50_000, dtype=np.uint16)
    write_stream(tmp_path / "s", tokens, vocab_size=60_000, shard_tokens=50_000)
    info = read_index(tmp_path / "s").shards[0]
    path = tmp_path / "s" / info.file
    before = pa.total_allocated_bytes()
    arr = read_shard(path, info, "uint16")
    assert pa.total_allocated_bytes() == before  # nothing was copied into Arrow's pool
    assert not arr.flags.writeable and not arr.flags.owndata
    assert np.array_equal(arr, tokens)
    # the array *is* the file: a change to the file's bytes shows through the view
    raw = path.read_bytes()
    offset = raw.find(tokens[1000:1008].tobytes())
    assert offset > 0
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([7777], dtype=np.uint16).tobytes())
    assert arr[1000] == 7777


# --- prepare ---------------------------------------------------------------------------

def test_prepare_text_jsonl_parquet(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("plain text ✓\n", encoding="utf-8")
    (src / "b.md").write_text("# heading\n", encoding="utf-8")
    rows = [{"text": "json one", "id": 1}, {"text": "json two"}]
    (src / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.table({"text": ["parquet α", "parquet β"], "n": [1, 2]}), src / "d.parquet")
    inputs = [src / n for n in ("a.txt", "b.md", "c.jsonl", "d.parquet")]
    res = prepare(inputs, tmp_path / "out", "byte", shard_tokens=16)
    docs = ["plain text ✓\n", "# heading\n", "json one", "json two", "parquet α", "parquet β"]
    assert res.documents == 6 and res.shards > 1
    tok = ByteTokenizer()
    stream = TokenShards(tmp_path / "out").read(0, res.tokens)
    expected = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    assert stream.tolist() == expected
    # a directory input is walked in sorted order: same stream
    res2 = prepare_command([str(src)], tmp_path / "out2", "byte", shard_tokens=16, verify=True)
    assert TokenShards(res2.out_dir).read(0, res2.tokens).tolist() == expected


def test_prepare_text_field_and_overwrite(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "abc"}) + "\n")
    out = tmp_path / "out"
    prepare([tmp_path / "c.jsonl"], out, text_field="body")
    assert TokenShards(out).read(0, 4).tolist() == [97, 98, 99, 256]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "xy"}) + "\n")
    prepare([tmp_path / "c.jsonl"], out, text_field="body", overwrite=True)
    assert TokenShards(out).read(0, 3).tolist() == [120, 121, 256]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]  # no temp dirs left


def test_bundled_prepare_is_deterministic(tmp_path):
    files = list(iter_bundled_files(SMALL_BUNDLE))
    assert files and sum(len(t.encode()) for _, t in files) <= SMALL_BUNDLE
    a = prepare_bundled(tmp_path / "a", max_bytes=SMALL_BUNDLE)
    b = prepare_bundled(tmp_path / "b", max_bytes=SMALL_BUNDLE)
    assert a.documents == len(files) and a.tokens > SMALL_BUNDLE // 2
    ta, tb = TokenShards(a.out_dir), TokenShards(b.out_dir)
    assert np.array_equal(ta.read(0, a.tokens), tb.read(0, b.tokens))
    assert ta.index.shards[0].crc32 == tb.index.shards[0].crc32


def test_ensure_prepared_concurrent_processes(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "from dist_train.data import ensure_prepared\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        f"print(ensure_prepared('bundled', {str(cache)!r}, 'byte', max_bytes={4 * SMALL_BUNDLE}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    final = Path(paths.pop())
    assert [p.name for p in cache.iterdir()] == [final.name]  # the loser left nothing behind
    assert read_index(final).documents > 0
    verify_shards(final)


def test_ensure_prepared_loser_discards_its_copy(tmp_path):
    cache = tmp_path / "cache"
    final = ensure_prepared("bundled", cache, max_bytes=SMALL_BUNDLE)
    first = read_index(final)
    # a second builder finishing after the first must keep the published copy and clean up
    res = prepare_mod._build(iter(["other"]), final, ByteTokenizer(), 1000, "arrow", "x",
                             replace=False, lose_ok=True)
    assert res.documents == first.documents and read_index(final) == first
    assert [p.name for p in cache.iterdir()] == [final.name]
    assert ensure_prepared("bundled", cache, max_bytes=SMALL_BUNDLE) == final  # cached
    assert ensure_prepared(final, cache, "byte") == final  # a prepared dir is used as is


# --- dataset ---------------------------------------------------------------------------

def test_dataset_samples_cross_shard_boundaries(tmp_path):
    tokens = (np.arange(1000) % 997).astype(np.uint16)
    write_stream(tmp_path / "s", tokens, shard_tokens=64)
    ds = TokenDataset(tmp_path / "s", seq_len=15)
    assert len(ds) == 1000 // 16 and ds.vocab_size == 1000
    for i in (0, 3, 4, len(ds) - 1, -1):
        x, y = ds[i]
        j = i % len(ds)
        window = torch.from_numpy(tokens[j * 16:(j + 1) * 16].astype(np.int64))
        assert x.dtype == torch.int64 and x.shape == (15,)
        assert torch.equal(x, window[:-1]) and torch.equal(y, window[1:])
    with pytest.raises(IndexError):
        ds[len(ds)]
    x, y = ds.batch(torch.tensor([4, 0]))
    assert x.shape == y.shape == (2, 15) and x.is_contiguous()
    assert torch.equal(x[0], ds[4][0]) and torch.equal(y[1], ds[0][1])


# --- sampler ---------------------------------------------------------------------------

def take(sampler: DistributedBatchSampler, steps: int) -> list[list[int]]:
    return [torch.cat(sampler.next_step()).tolist() for _ in range(steps)]


def global_steps(n, gb, mb, dp, steps, seed=0, state=None) -> list[list[int]]:
    """Each step's global batch, gathered from every rank in rank order."""
    samplers = [DistributedBatchSampler(n, global_batch=gb, micro_batch=mb, dp_size=dp,
                                        dp_rank=r, seed=seed) for r in range(dp)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(state)
    per_rank = [take(s, steps) for s in samplers]
    return [sum((per_rank[r][k] for r in range(dp)), []) for k in range(steps)]


def test_sampler_dp1_returns_the_global_batch_in_micro_batches():
    s = DistributedBatchSampler(100, global_batch=12, micro_batch=4, seed=1)
    for _ in range(3):
        expected = s.peek_global_batch().tolist()
        mbs = s.next_step()
        assert [len(m) for m in mbs] == [4, 4, 4] and all(m.dtype == torch.int64 for m in mbs)
        assert torch.cat(mbs).tolist() == expected
        assert len(set(expected)) == 12 and all(0 <= i < 100 for i in expected)


def test_sampler_ranks_are_disjoint_and_dp_layout_does_not_change_the_sequence():
    n, gb = 200, 16
    dp4 = [DistributedBatchSampler(n, global_batch=gb, micro_batch=2, dp_size=4, dp_rank=r, seed=5)
           for r in range(4)]
    for _ in range(5):
        parts = [set(torch.cat(s.next_step()).tolist()) for s in dp4]
        assert all(len(p) == 4 for p in parts)
        assert len(set().union(*parts)) == gb  # disjoint and together the whole global batch
    assert global_steps(n, gb, 2, 4, 20, seed=5) == global_steps(n, gb, 16, 1, 20, seed=5)
    assert global_steps(n, gb, 2, 4, 5, seed=5) != global_steps(n, gb, 2, 4, 5, seed=6)


def test_sampler_resume_on_another_layout_continues_exactly():
    n, gb = 103, 8  # 12 steps per epoch: the run below crosses two epoch boundaries
    full = global_steps(n, gb, 8, 1, 30, seed=9)
    first = DistributedBatchSampler(n, global_batch=gb, micro_batch=2, dp_size=2, dp_rank=0, seed=9)
    take(first, 7)
    state = first.state_dict()
    assert state["consumed_samples"] == 7 * gb and state["global_batch"] == gb
    resumed = global_steps(n, gb, 1, 4, 23, seed=9, state=state)  # dp 2 -> 4, micro 2 -> 1
    assert resumed == full[7:]
    # and a state saved exactly at an epoch boundary
    at_boundary = DistributedBatchSampler(n, global_batch=gb, micro_batch=8, seed=9)
    take(at_boundary, 12)
    assert at_boundary.state_dict()["epoch"] == 1
    assert global_steps(n, gb, 4, 2, 3, seed=9, state=at_boundary.state_dict()) == full[12:15]


def test_sampler_epoch_rollover_is_deterministic():
    n, gb = 50, 8  # 6 steps per epoch, 2 samples dropped each epoch
    s = DistributedBatchSampler(n, global_batch=gb, micro_batch=4, seed=3)
    epochs = [sum(take(s, 6), []) for _ in range(3)]
    for e in epochs:
        assert len(set(e)) == 48
    assert epochs[0] != epochs[1] != epochs[2]
    s2 = DistributedBatchSampler(n, global_batch=gb, micro_batch=8, seed=3)
    assert [sum(take(s2, 6), []) for _ in range(3)] == epochs
    assert s.epoch == 3 and s.step == 18
