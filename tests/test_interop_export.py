"""HF export (`dist-train export`): runs trained under tp = 2 x dp_shard = 2 (dense), with
experts over ep = 2 x dp_shard = 4 (MoE) and as DiLoCo replicas (2 x dp_shard = 2), all in
one 4-rank launch, exported with --format hf:
- transformers loads them (LlamaForCausalLM; MixtralForCausalLM for the MoE run) and gives
  the loss dist-train's own eval gave on the held-out samples, within c x eps32 x
  sqrt(tokens) (tests/equivalence.py, c = 4 for a step's loss);
- importing the export (`model.init_from = "hf:..."`) gives the checkpoint's tensors bit
  for bit, sharded into several files with an index or in one;
- --format torch gives the same tensors; DiLoCo exports the global parameters by
  default and a replica's with --replica; mistakes are one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics, run_cli, sweep
from tests.equivalence import C_VALUE, rtol

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

STEPS = 4
COMMON = {"train.steps": STEPS, "checkpoint.every": STEPS, "eval.every": STEPS, "eval.batches": 1,
          "train.global_batch": 16, "data.verify": "off"}
MOE = {"model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_every": 1, "parallel.ep": 2, "parallel.dp_shard": 4}
RUNS = {
    "dense": {"parallel.tp": 2, "parallel.dp_shard": 2},
    "moe": MOE,
    # saved one step after an outer step, so the replicas' own parameters differ from the global ones
    "diloco": {"parallel.dp_shard": 2, "diloco.enabled": "true", "diloco.replicas": 2, "diloco.inner_steps": 2,
               "train.steps": STEPS + 1, "checkpoint.every": STEPS + 1, "eval.every": 0},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    sweep(root, 4, RUNS, COMMON)
    return root


def export(root: Path, run: str, name: str, *args: str) -> Path:
    out = root / "exports" / name
    proc = run_cli("export", str(root / run), "--out", str(out), *args, timeout=120)
    assert "exported" in proc.stdout
    return out


def checkpoint_tensors(run_dir: Path) -> dict:
    """Every tensor of the run's last checkpoint, by its DCP key, without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    dst = run_dir / "full.pt"
    if not dst.exists():
        dcp_to_torch_save(ckpt, dst)
    flat = {}

    def walk(prefix, obj):
        for k, v in obj.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, torch.Tensor):
                flat[prefix + k] = v
    walk("", torch.load(dst, weights_only=False))
    return flat


def held_out(run_dir: Path):
    """The samples the run's eval used: the last eval.batches x global_batch of the data."""
    from dist_train.config import load_config
    from dist_train.data import TokenDataset, ensure_prepared

    cfg = load_config(run_dir / "config.toml", [])
    ds = TokenDataset(ensure_prepared(cfg.data.source, cfg.data.cache_dir or None, cfg.data.tokenizer),
                      cfg.data.seq_len, cfg.data.tokenizer)
    n = cfg.eval.batches * cfg.train.global_batch
    return ds.batch(range(len(ds) - n, len(ds)))


def hf_loss(model, inputs, targets) -> float:
    with torch.no_grad():
        logits = model(inputs).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()


@pytest.mark.parametrize("run, cls", [("dense", "LlamaForCausalLM"), ("moe", "MixtralForCausalLM")])
def test_transformers_gives_dist_trains_eval_loss(root, run, cls):
    out = export(root, run, f"{run}-hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [cls]
    model = getattr(transformers, cls).from_pretrained(out).eval()
    inputs, targets = held_out(root / run)
    got = hf_loss(model, inputs, targets)
    want = read_metrics(root / run)[-1]["eval_loss"]
    bound = rtol(targets.numel(), C_VALUE)
    assert abs(got - want) <= bound * abs(want), f"{run}: transformers {got!r} vs dist-train's eval {want!r}"


@pytest.mark.parametrize("shards", ["one", "several"])
def test_import_of_the_export_is_the_checkpoint_bit_for_bit(root, shards):
    from dist_train.config import load_config
    from dist_train.interop.hf_import import load_hf_weights
    from dist_train.model import ModelArgs, Transformer

    out = export(root, "dense", f"dense-{shards}", *(["--max-shard-size", "40KB"] if shards == "several" else []))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert (len(files) > 1) == (shards == "several")
    assert (out / "model.safetensors.index.json").exists() == (shards == "several")
    cfg = load_config(None, [f"model.init_from=hf:{out}", "data.seq_len=128"])
    args = ModelArgs.from_config(cfg.model, 128, 258)
    model = Transformer(args)
    load_hf_weights(model, cfg.model.init_from, args)
    saved = checkpoint_tensors(root / "dense")
    got = dict(model.named_parameters())
    assert set(got) == {k[len("model."):] for k in saved if k.startswith("model.")}
    for name, p in got.items():
        assert torch.equal(p.detach(), saved["model." + name]), name


def test_torch_format_is_the_checkpoint(root):
    out = export(root, "moe", "moe-torch", "--format", "torch")
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "model.pt"]
    got = torch.load(out / "model.pt")
    saved = {k[len("model."):]: v for k, v in checkpoint_tensors(root / "moe").items() if k.startswith("model.")}
    assert got.keys() == saved.keys()
    for k in saved:
        assert torch.equal(got[k], saved[k]), k


@pytest.mark.parametrize("run", ["dense", "moe"])
def test_blocks_are_read_straight_from_the_stored_chunks(root, run):
    """Blocks of a few rows (far smaller than a stored chunk) reassemble every tensor bit
    for bit, row chunks (FSDP, experts) and column chunks (tp) alike, all read from the
    chunks' raw records: never through dcp.load, which loads a whole chunk per block."""
    from dist_train.interop.export import ChunkReader, find_checkpoint, row_blocks

    reader = ChunkReader(find_checkpoint(root / run, None))

    def no_dcp(key, *args):
        raise AssertionError(f"{key} went through dcp.load")
    reader._via_dcp = no_dcp
    saved = checkpoint_tensors(root / run)
    model = {k: md for k, md in reader.tensors.items() if k.startswith("model.")}
    columns = 0
    for key, md in model.items():
        blocks = row_blocks(md, max_bytes=300)
        assert sum(n for _, n in blocks) == md.size[0], key
        assert torch.equal(torch.cat([reader.rows(key, r0, n) for r0, n in blocks]), saved[key]), key
        columns += any(tuple(c.sizes[1:]) != tuple(md.size[1:]) for c in md.chunks)
    if run == "dense":
        assert columns > 0  # tp = 2 stores the row-parallel weights as column chunks


def test_blocks_through_dcp_load_are_the_same(root):
    """The fallback (a blob DCP transformed, or not laid out as a plain contiguous chunk)
    reads each block through dcp.load and gives the same tensors."""
    from dist_train.interop.export import ChunkReader, find_checkpoint, row_blocks

    reader = ChunkReader(find_checkpoint(root / "dense", None))
    reader._record = lambda key, i: None
    saved = checkpoint_tensors(root / "dense")
    for key, md in reader.tensors.items():
        if key.startswith("model."):
            assert torch.equal(torch.cat([reader.rows(key, r0, n) for r0, n in row_blocks(md)]), saved[key]), key


@pytest.mark.parametrize("which, prefix", [([], "diloco.global."), (["--replica", "1"], "replica1.model.")])
def test_diloco_exports_the_global_or_a_replicas_parameters(root, which, prefix):
    from safetensors.torch import load_file

    from dist_train.interop.hf_names import to_hf

    out = export(root, "diloco", "diloco" + "".join(which), *which)
    got = load_file(out / "model.safetensors")
    saved = {k[len(prefix):]: v for k, v in checkpoint_tensors(root / "diloco").items() if k.startswith(prefix)}
    assert len(got) == len(saved)
    for name, t in saved.items():
        (hf, _), = to_hf(name)
        assert torch.equal(got[hf], t), name
    other = "replica1.model." if prefix == "diloco.global." else "diloco.global."
    others = {k[len(other):]: v for k, v in checkpoint_tensors(root / "diloco").items() if k.startswith(other)}
    assert any(not torch.equal(others[n], saved[n]) for n in saved), "global and replica parameters are equal"


def test_bf16_export_loads_as_bf16(root):
    from safetensors import safe_open

    out = export(root, "dense", "dense-bf16", "--dtype", "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    saved = checkpoint_tensors(root / "dense")
    with safe_open(out / "model.safetensors", "pt") as f:
        t = f.get_tensor("model.embed_tokens.weight")
    assert t.dtype == torch.bfloat16 and torch.equal(t, saved["model.tok_embeddings.weight"].bfloat16())


def test_mistakes_are_one_line(root, tmp_path):
    def fails(*args):
        proc = run_cli("export", *args, check=False, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dist-train: error: "), proc.stderr
        return lines[0]

    assert "not a run directory" in fails(str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert "--step 3" in fails(str(root / "dense"), "--step", "3", "--out", str(tmp_path / "o"))
    assert "--replica 5" in fails(str(root / "diloco"), "--replica", "5", "--out", str(tmp_path / "o"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "not empty" in fails(str(root / "dense"), "--out", str(full))
    assert (full / "keep.txt").read_text() == "mine"


def test_moe_shapes_mixtral_cannot_hold_are_refused():
    import dataclasses

    from dist_train.config import load_config
    from dist_train.interop import InteropError
    from dist_train.interop.hf_config import mixtral_config
    from dist_train.model import ModelArgs

    base = ModelArgs.from_config(load_config(None, ["model.moe_experts=4"]).model, 128, 258)
    mixtral_config(base, dtype="float32", max_seq_len=128)
    for change, words in (({"moe_every": 2}, "model.moe_every = 2"), ({"moe_shared_expert": True}, "shared expert"),
                          ({"moe_capacity_factor": 1.25}, "dropless")):
        with pytest.raises(InteropError, match=words):
            mixtral_config(dataclasses.replace(base, **change), dtype="float32", max_seq_len=128)
