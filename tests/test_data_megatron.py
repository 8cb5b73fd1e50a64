"""Megatron-LM's indexed dataset (data/megatron.py) against megatron-core 0.16.1 itself:
- pairs written by megatron-core's IndexedDatasetBuilder (documents of one or several
  sequences, empty documents, uint16 and int32) read back through `megatron:PREFIX`
  document for document as megatron-core's IndexedDataset yields them, and as one stream
  for training samples;
- our writer's files are byte-identical to the builder's for the same documents, and
  `dist-train prepare --format megatron [--append-eod]` writes a pair megatron-core reads;
- Megatron's dtype rule; truncated, mismatched or foreign files and out-of-vocabulary ids
  are one line naming the file.
"""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

with warnings.catch_warnings():  # megatron-core warns that Apex / Transformer Engine are absent
    warnings.simplefilter("ignore")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

from dist_train.data import DataError, MegatronTokens, MegatronWriter, TokenDataset, megatron_dtype  # noqa: E402


def random_docs(n: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=int(rng.integers(1, 40))) for _ in range(n)]
    docs[3] = np.zeros(0, dtype=np.int64)  # an empty document
    return docs


def build_with_megatron(prefix, docs, dtype, split_every: int = 0):
    """megatron-core's builder; with split_every, every document of more than that many
    tokens goes in as two sequences (what --split-sentences produces)."""
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in docs:
        if split_every and len(d) > split_every:
            builder.add_item(torch.from_numpy(d[:split_every]))
            builder.add_item(torch.from_numpy(d[split_every:]))
            builder.end_document()
        else:
            builder.add_document(d, [len(d)] if len(d) else [])
    builder.finalize(f"{prefix}.idx")


def megatron_documents(prefix) -> list[np.ndarray]:
    ds = indexed.IndexedDataset(str(prefix))
    idx = ds.document_indices
    return [np.concatenate([ds[j] for j in range(idx[d], idx[d + 1])] or [np.zeros(0, ds.index.dtype)])
            for d in range(len(idx) - 1)]


@pytest.mark.parametrize("vocab, split_every", [(1000, 0), (70000, 0), (1000, 10)])
def test_reads_what_megatron_core_writes_document_for_document(tmp_path, vocab, split_every):
    prefix = tmp_path / "corpus_text_document"
    docs = random_docs(12, vocab)
    build_with_megatron(prefix, docs, megatron_dtype(vocab).type, split_every)
    ours = MegatronTokens(prefix, vocab)
    theirs = megatron_documents(prefix)
    assert len(ours) == len(theirs) == len(docs)
    for d, (a, b) in enumerate(zip(theirs, docs)):
        assert np.array_equal(ours.document(d), a) and np.array_equal(a, b), f"document {d}"
    stream = np.concatenate(docs)
    assert np.array_equal(ours.read(0, ours.total_tokens), stream)


def test_training_samples_are_windows_of_the_documents(tmp_path):
    from dist_train.data import ensure_prepared

    prefix = tmp_path / "c"
    docs = random_docs(20, 258, seed=1)
    build_with_megatron(prefix, docs, np.uint16)
    source = ensure_prepared(f"megatron:{prefix}", None, "byte")
    ds = TokenDataset(source, 16, tokenizer="byte")
    stream = np.concatenate(docs)
    assert len(ds) == len(stream) // 17 and ds.vocab_size == 258 and ds.eos_id == 256
    x, y = ds.batch([0, len(ds) - 1])
    assert torch.equal(x[1], torch.from_numpy(stream[(len(ds) - 1) * 17:(len(ds) - 1) * 17 + 16]))
    assert torch.equal(y[0], torch.from_numpy(stream[1:17]))


@pytest.mark.parametrize("vocab", [1000, 65499, 65500, 70000])
def test_writer_is_byte_identical_to_megatron_cores_builder(tmp_path, vocab):
    assert megatron_dtype(vocab) == np.dtype(indexed.DType.optimal_dtype(vocab))
    docs = random_docs(15, vocab, seed=2)
    build_with_megatron(tmp_path / "theirs", docs, megatron_dtype(vocab).type)
    writer = MegatronWriter(tmp_path / "ours", vocab)
    for d in docs:
        writer.add_document(d)
    writer.close()
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes(), ext


def test_prepare_format_megatron_reads_back_in_megatron_core(tmp_path):
    texts = ["hello world", "zweite Zeile: grüße", "third document\nwith two lines"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for eod in (False, True):
        prefix = tmp_path / f"out-{eod}"
        proc = run_cli("prepare", str(src), "--format", "megatron", "--out", str(prefix), "--verify",
                       *(["--append-eod"] if eod else []), timeout=60)
        assert f"{prefix}.bin + {prefix}.idx" in proc.stdout and "uint16" in proc.stdout
        got = megatron_documents(prefix)
        want = [list(t.encode()) + ([256] if eod else []) for t in texts]
        assert [g.tolist() for g in got] == want
        assert indexed.IndexedDataset(str(prefix)).index.dtype == np.uint16


def test_prepare_megatron_refuses_to_overwrite_or_write_nothing(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("some text")
    prefix = tmp_path / "p"
    run_cli("prepare", str(src), "--format", "megatron", "--out", str(prefix), timeout=60)
    before = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())
    for args, words in (([str(src)], "already exists"), ([str(tmp_path / "empty.txt"), "--overwrite"], "holds no text"),
                        ([str(src), "--append-eod", "--format", "arrow"], "--append-eod is for --format megatron")):
        (tmp_path / "empty.txt").write_text("")
        fmt = [] if "--format" in args else ["--format", "megatron"]
        proc = run_cli("prepare", *args, *fmt, "--out", str(prefix), check=False, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "empty.txt", "p.bin", "p.idx"]


def _pair(tmp_path, name="c", vocab=1000, n=12):
    prefix = tmp_path / name
    build_with_megatron(prefix, random_docs(n, vocab), np.uint16)
    return prefix


@pytest.mark.parametrize("damage, words", [
    ("truncate_bin", "c.bin holds"),
    ("truncate_idx", "c.idx holds"),
    ("other_idx", "the pair does not match"),
    ("magic", "not a Megatron index"),
    ("no_bin", "c.bin does not exist"),
    ("no_idx", "c.idx does not exist"),
    ("version", "index version 2"),
])
def test_damaged_pairs_are_one_line_naming_the_file(tmp_path, damage, words):
    prefix = _pair(tmp_path)
    bin_, idx = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
    if damage == "truncate_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif damage == "truncate_idx":
        idx.write_bytes(idx.read_bytes()[:-8])
    elif damage == "other_idx":
        shutil.copy(_pair(tmp_path, "other", n=30).with_suffix(".idx"), idx)
    elif damage == "magic":
        idx.write_bytes(b"NOTMEGA!!" + idx.read_bytes()[9:])
    elif damage == "no_bin":
        bin_.unlink()
    elif damage == "no_idx":
        idx.unlink()
    elif damage == "version":
        raw = bytearray(idx.read_bytes())
        raw[9] = 2
        idx.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=words) as e:
        MegatronTokens(prefix, 1000)
    assert "\n" not in str(e.value)


def test_token_outside_the_vocabulary_names_the_file(tmp_path):
    prefix = _pair(tmp_path, vocab=1000)
    ds = TokenDataset(f"megatron:{prefix}", 8, tokenizer="byte")  # 258 ids: the dataset holds larger ones
    with pytest.raises(DataError, match=r"c\.bin: token id \d+ at position \d+ is outside the vocabulary of "
                                        r"data.tokenizer \(258 ids\)"):
        for i in range(len(ds)):
            ds[i]
    with pytest.raises(DataError, match=r"c\.bin: token id"):
        ds.shards.verify(0)  # the background check reads every id


def test_cli_refuses_a_broken_source_in_one_line(tmp_path):
    prefix = _pair(tmp_path, vocab=200)
    prefix.with_suffix(".bin").write_bytes(b"\x00" * 7)
    proc = run_cli("local", "--nproc", "1", "--set", f"data.source=megatron:{prefix}", "--set",
                   f"run.dir={tmp_path}", check=False, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "c.bin holds 7 bytes" in lines[0], proc.stderr
