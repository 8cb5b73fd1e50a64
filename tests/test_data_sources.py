"""`data.source = "parquet:GLOB"` / `"jsonl:GLOB"` (data/sources.py): a local copy of a Hub
dataset (parquet files under data/, the text in a named column) gives the same token
stream as `dist-train prepare` of the same files, is prepared once (a changed file is
prepared again), and trains without conversion by hand; so does a Megatron pair
(`megatron:PREFIX`). One 1-rank launch trains on both, and resumes on the Megatron one.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_metrics, run_cli, sweep

from dist_train.data import DataError, TokenDataset, ensure_prepared, prepare  # noqa: E402


def hub_copy(root, rows=(40, 25)):
    """Parquet files laid out as a Hub dataset's: data/train-0000i-of-0000n.parquet, the text
    in column 'content' beside other columns."""
    d = root / "data"
    d.mkdir(parents=True)
    k = 0
    for i, n in enumerate(rows):
        texts = [f"document {k + j}: " + "lorem ipsum dolor sit amet " * (1 + (k + j) % 7) for j in range(n)]
        k += n
        pq.write_table(pa.table({"id": list(range(n)), "content": texts}), d / f"train-{i:05d}-of-{len(rows):05d}.parquet")
    return d


def test_parquet_glob_is_the_stream_prepare_makes(tmp_path):
    d = hub_copy(tmp_path / "hub")
    via_source = ensure_prepared(f"parquet:{d}/*.parquet", tmp_path / "cache", "byte", text_field="content")
    ref = prepare(sorted(d.glob("*.parquet")), tmp_path / "ref", "byte", text_field="content")
    a, b = TokenDataset(via_source, 64), TokenDataset(ref.out_dir, 64)
    assert a.total_tokens == b.total_tokens == ref.tokens
    assert np.array_equal(a.shards.read(0, a.total_tokens), b.shards.read(0, b.total_tokens))
    # prepared once: the same folder again; a changed file gives a new one
    assert ensure_prepared(f"parquet:{d}/*.parquet", tmp_path / "cache", "byte", text_field="content") == via_source
    pq.write_table(pa.table({"content": ["another text"]}), d / "train-00000-of-00002.parquet")
    again = ensure_prepared(f"parquet:{d}/*.parquet", tmp_path / "cache", "byte", text_field="content")
    assert again != via_source and TokenDataset(again, 4).total_tokens < a.total_tokens


def test_jsonl_glob_reads_json_lines_whatever_the_suffix(tmp_path):
    f = tmp_path / "part-0.json"  # Hub exports often name JSON-lines files *.json
    f.write_text("".join(json.dumps({"body": f"line {i} text"}) + "\n" for i in range(30)))
    out = ensure_prepared(f"jsonl:{tmp_path}/*.json", tmp_path / "cache", "byte", text_field="body")
    ds = TokenDataset(out, 8)
    assert ds.shards.index.documents == 30


@pytest.mark.parametrize("source, field, words", [
    ("parquet:{d}/*.nope", "content", "no file matches"),
    ("parquet:{d}/*.parquet", "text", "has no column 'text'"),
    ("parquet:", "content", "expected parquet:GLOB"),
])
def test_source_mistakes_name_the_field(tmp_path, source, field, words):
    d = hub_copy(tmp_path / "hub")
    with pytest.raises(DataError, match=words):
        ensure_prepared(source.format(d=d), tmp_path / "cache", "byte", text_field=field)
    assert not any((tmp_path / "cache").glob("parquet-*")) if (tmp_path / "cache").exists() else True


def test_trains_on_parquet_and_megatron_sources(tmp_path):
    d = hub_copy(tmp_path / "hub", rows=(200, 150))
    prefix = tmp_path / "meg"
    run_cli("prepare", str(d), "--text-field", "content", "--format", "megatron", "--append-eod", "--out",
            str(prefix), timeout=60)
    common = {"train.steps": 3, "train.global_batch": 4, "data.seq_len": 64, "checkpoint.every": 3,
              "data.text_field": "content"}
    (tmp_path / "runs").mkdir()
    sweep(tmp_path / "runs", 1, {
        "parquet": {"data.source": f"parquet:{d}/*.parquet"},
        "megatron": {"data.source": f"megatron:{prefix}"},
        "megatron ": {"run.name": "megatron", "data.source": f"megatron:{prefix}", "train.steps": 5},
    }, common)
    pq_losses = [r["loss"] for r in read_metrics(tmp_path / "runs" / "parquet")]
    meg = read_metrics(tmp_path / "runs" / "megatron")
    assert len(pq_losses) == 3 and [r["step"] for r in meg] == [1, 2, 3, 4, 5]  # resumed at 3, went on to 5
    assert all(np.isfinite(pq_losses)) and all(np.isfinite([r["loss"] for r in meg]))
