"""Config loading, overrides and validation: each bad input gets a message naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from dist_train.config import Config, ConfigError, build_config, load_config, parse_override
from dist_train.layout import check_layout
from tests.conftest import REPO, run_cli


def test_tiny_config_loads_with_overrides():
    cfg = load_config(REPO / "configs/tiny.toml", ["train.steps=7", "run.name=x", "train.lr=1e-3",
                                                   "metrics.progress=false"])
    assert (cfg.train.steps, cfg.run.name, cfg.train.lr, cfg.metrics.progress) == (7, "x", 1e-3, False)
    assert cfg.parallel.dp_shard == -1 and cfg.model.dim == 64


def test_llama_1b_config_is_valid():
    cfg = load_config(REPO / "configs/llama-1b.toml")
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.vocab_size) == (2048, 16, 128256)


def test_preset_fills_unset_fields_and_explicit_fields_win():
    cfg = build_config({"model": {"preset": "llama-8b", "n_layers": 2}})
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.ffn_dim) == (4096, 2, 14336)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["train.steps=3", "fault.inject=['delay:rank=1,ms=50']"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path).to_dict() == cfg.to_dict()


def test_override_values_parse_as_toml_literals():
    assert parse_override("train.lr=3e-4") == ("train", "lr", 3e-4)
    assert parse_override("run.name=my-run") == ("run", "name", "my-run")
    assert parse_override("metrics.progress=false") == ("metrics", "progress", False)


def test_dp_shard_minus_one_fills_the_world():
    cfg = load_config(None, ["parallel.dp_replicate=2"])
    assert check_layout(cfg, 8).dp_shard == 4
    assert check_layout(load_config(None, ["train.global_batch=12"]), 3).dp_shard == 3


BAD_OVERRIDES = [
    (["train.stepz=5"], "unknown config key train.stepz; did you mean 'steps'"),
    (["trian.steps=5"], "unknown config section [trian]; did you mean 'train'"),
    (["train.steps=five"], "train.steps = 'five': must be an integer"),
    (["train.steps=0"], "train.steps = 0: must be >= 1"),
    (["train.lr=-1.0"], "train.lr = -1.0: must be >= 0.0"),
    (["train.dtype=fp16"], "train.dtype = 'fp16': must be one of 'auto', 'fp32', 'bf16'"),
    (["parallel.pp_schedule=1f2b"], "did you mean '1f1b'"),
    (["metrics.progress=3"], "metrics.progress = 3: must be true or false"),
    (["train.global_batch=15"], "train.global_batch = 15 is not divisible by train.micro_batch = 2"),
    (["model.n_heads=3"], "model.dim = 64 is not divisible by model.n_heads = 3"),
    (["model.n_kv_heads=3"], "model.n_kv_heads = 3 must divide model.n_heads = 4"),
    (["model.preset=llama-70b"], "model.preset = 'llama-70b' is not a preset"),
    (["checkpoint.resume=/no/such/ckpt"], "checkpoint.resume = '/no/such/ckpt': no such checkpoint"),
    (["run.name=a/b"], "run.name = 'a/b': must be a plain folder name"),
    (["parallel.dp_shard=0"], "parallel.dp_shard = 0"),
    (["train.beta2=1.5"], "train.beta2 = 1.5: must be <= 1.0"),
    (["steps=5"], "expected section.key=value"),
    (["kernels.backend=cuda"], "kernels.backend = 'cuda': must be one of"),
    (["diloco.inner_steps=0"], "diloco.inner_steps = 0: must be >= 1"),
    (["diloco.quantize=int4"], "diloco.quantize = 'int4': must be one of 'none', 'bf16', 'int8'"),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_override_is_refused_with_field_and_fix(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/tiny.toml", overrides)
    assert message in str(e.value)


BAD_LAYOUTS = [
    (["parallel.dp_shard=3"], 4, "= 3, but the job has 4 ranks"),
    (["parallel.dp_replicate=3"], 4, "world size 4 is not divisible by diloco x pp x dp_replicate x tp = 3"),
    (["train.global_batch=6", "train.micro_batch=2"], 4, "must be divisible by dp x micro_batch = 4 x 2 = 8"),
    (["parallel.ep=2"], 4, "parallel.ep = 2 needs mixture-of-experts layers: set model.moe_experts"),
    (["parallel.ep=4", "model.moe_experts=6"], 4, "model.moe_experts = 6 is not divisible by parallel.ep = 4"),
    (["parallel.ep=3", "model.moe_experts=6"], 4, "parallel.ep = 3 must divide dp_shard x tp = 4"),
    (["parallel.tp=4"], 4, "parallel.tp = 4 must divide model.n_kv_heads = 2"),
    (["parallel.tp=2", "model.ffn_dim=99"], 4, "parallel.tp = 2 must divide model.ffn_dim = 99"),
    (["parallel.pp=3"], 3, "model.n_layers = 4 cannot be split for parallel.pp = 3"),
    (["parallel.pp=4", "parallel.pp_schedule=interleaved"], 4, "n_layers must be a multiple of pp x 2 = 8"),
    (["parallel.pp=2", "model.tie_embeddings=true"], 2, "model.tie_embeddings = true cannot be used with pipeline"),
    (["parallel.pp=4", "train.global_batch=4"], 4, "2 micro-batch(es) per step, fewer than parallel.pp = 4"),
    (["diloco.replicas=2"], 4, "diloco.replicas = 2 needs diloco.enabled = true"),
    (["diloco.enabled=true", "diloco.replicas=3"], 4, "diloco.replicas = 3 does not divide the 4 ranks"),
    (["diloco.enabled=true", "diloco.inner_steps=10", "diloco.fragments=3"], 4,
     "diloco.fragments = 3 must divide diloco.inner_steps = 10"),
    (["diloco.enabled=true", "diloco.inner_steps=10", "diloco.fragments=5"], 4,
     "diloco.fragments = 5 is more than model.n_layers = 4"),
    (["diloco.enabled=true", "diloco.overlap=true"], 4, "diloco.overlap = true is for streaming DiLoCo"),
    (["diloco.enabled=true", "diloco.replicas=2", "train.global_batch=4"], 4,
     "must be divisible by diloco.replicas x dp x micro_batch = 4 x 2 = 8"),
]


@pytest.mark.parametrize("overrides,world,message", BAD_LAYOUTS, ids=[o[0][0] for o in BAD_LAYOUTS])
def test_layout_that_does_not_fit_the_world_is_refused(overrides, world, message):
    cfg = load_config(REPO / "configs/tiny.toml", overrides)
    with pytest.raises(ValueError) as e:
        check_layout(cfg, world)
    assert message in str(e.value)


def test_bad_toml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad.write_text("steps = 3\n")
    with pytest.raises(ConfigError, match="must be a \\[section\\] table"):
        load_config(bad)


def test_cli_prints_one_clear_line_without_traceback(tmp_path):
    proc = run_cli("local", "--nproc", "4", "configs/tiny.toml", "--set", "parallel.dp_shard=3",
                   "--set", f"run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "dist-train: error:" in proc.stderr and "but the job has 4 ranks" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("train", "configs/tiny.toml", "--set", "train.stepz=3", check=False)
    assert proc.returncode == 2 and "did you mean 'steps'" in proc.stderr and "Traceback" not in proc.stderr


def test_defaults_are_the_tiny_demo():
    cfg = Config()
    assert cfg.model.preset == "tiny" and cfg.data.source == "bundled" and cfg.parallel.dp_shard == -1


def test_readme_config_table_is_the_config():
    """The README's table lists every key with its default and meaning, as the code has them."""
    from dist_train.config import config_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- config-table: generated by `python -m dist_train.config` -->\n", "<!-- /config-table -->"
    assert start in readme and end in readme, "README.md lost its config-table markers"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == config_table(), "README.md's config table is stale: paste `python -m dist_train.config` into it"
