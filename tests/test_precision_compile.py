"""FSDP2's mixed precision (`train.param_dtype`, `train.reduce_dtype`) and per-block
`train.compile`, through the real trainer on 2 gloo ranks, in one launch.

Precision: on the CPU (gloo) every offered dtype runs (gloo gathers and reduces bf16), so
the checks show that a setting takes effect, against the fp32 run of the same layout:
- the bytes FSDP's collectives move are the analytic model's with 2-byte parameters
  (param_dtype = bf16: all-gathers halve) or 2-byte gradients (reduce_dtype = bf16:
  reduce-scatters halve), exactly;
- gradients reduced in bf16 move the parameters by more than any fp32 reordering could
  (tests/equivalence.py's bound), and by no more than bf16 rounding of the gradients can:
  each of a step's reduce-scatters rounds a gradient entry at most twice (cast, then the
  sum of the two ranks' shares), each by at most eps_bf16 of the entries it sums;
- a bf16 forward (param_dtype = bf16, or fp32 gathers under autocast) changes the first
  step's gradient norm by more than an fp32 reordering and less than C_GRAD x eps_bf16 of it.
Compile: dp_shard = 2, tp = 2 and pp = 2 (1F1B) compiled with aot_eager (torch.compile's
graph capture and autograd, the kernels eager) give the eager run's losses and gradient
norms within 1e-5 relative; one dp_shard = 2 run compiles with inductor, the default.

All runs: the tiny model, global batch 8, 3 SGD steps without weight decay (an update is
then lr x the gradient, so a parameter's displacement per step is the gradient's size).
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_cli, sweep
from tests.equivalence import C_GRAD, C_VALUE, EPS, SGD, initial_params, load_params, read_config, rtol

STEPS = 3
TOKENS = 8 * 128  # per step: global batch x seq_len
EPS_BF16 = torch.finfo(torch.bfloat16).eps
COMMON = {"train.global_batch": 8, "train.steps": STEPS, "checkpoint.every": STEPS, **SGD,
          "train.weight_decay": 0.0}
DPS2 = {"parallel.dp_shard": 2}
AOT = {"train.compile": "true", "train.compile_backend": "aot_eager"}
LAYOUTS = {"dps2": DPS2, "tp2": {"parallel.tp": 2}, "pp2": {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"}}
RUNS = {
    "dps2": {**DPS2, "checkpoint.every": 1, "checkpoint.keep": STEPS},  # every step: the displacements
    "reduce_bf16": {**DPS2, "train.reduce_dtype": "bf16"},
    "param_bf16": {**DPS2, "train.param_dtype": "bf16"},
    "autocast_bf16": {**DPS2, "train.dtype": "bf16", "train.param_dtype": "fp32"},
    "tp2": LAYOUTS["tp2"], "pp2": LAYOUTS["pp2"],
    **{f"{name}_compiled": {**sets, **AOT} for name, sets in LAYOUTS.items()},
    "dps2_inductor": {**DPS2, "train.compile": "true"},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prec")
    sweep(root, 2, RUNS, COMMON)
    return root


# ----------------------------------------------------------------------------- precision


def step_bytes(root, name) -> list[dict]:
    from dist_train.comm_model import KINDS

    return [{k: r["comm"][k]["bytes"] // 2 for k in KINDS} for r in read_metrics(root / name)]


@pytest.mark.parametrize("name,param_bytes,reduce_bytes", [("dps2", 4, 4), ("reduce_bf16", 4, 2),
                                                          ("param_bf16", 2, 4), ("autocast_bf16", 4, 4)])
def test_fsdp_collectives_move_the_dtype_they_are_given(root, name, param_bytes, reduce_bytes):
    """All-gathers carry parameters in param_dtype, reduce-scatters gradients in
    reduce_dtype: the analytic bytes with that many bytes per value, every step."""
    from dist_train.comm_model import dense_step_bytes
    from dist_train.model import ModelArgs

    cfg = read_config(root / name)
    a = ModelArgs.from_config(cfg.model, cfg.data.seq_len, tokenizer_vocab=258)
    expect = dense_step_bytes(a, 1, 2, 1, cfg.data.seq_len, cfg.train.global_batch, cfg.train.micro_batch,
                              param_bytes=param_bytes, reduce_bytes=reduce_bytes)
    assert step_bytes(root, name) == [expect] * STEPS


def test_bf16_gradient_reduction_rounds_as_bf16_does(root):
    """reduce_dtype = bf16 against fp32 (the same layout and data): every weight matrix
    differs by at most 2 bf16 roundings of each step's gradients (module docstring; the
    factor C_VALUE covers a rank's share being larger than the mean gradient, which sets
    the step's displacement), and by more than fp32 reordering allows: 10x that bound in
    the median, and beyond it for 90% of the matrices at least (one that hardly moved, as
    the last layers' wq and wk at init, sits near the floor of fp32's own rounding of its
    weights: measured 1.8x there, 17-47x elsewhere)."""
    steps = [load_params(root / "dps2" / f"checkpoints/step-{s:06d}") for s in range(1, STEPS + 1)]
    init = initial_params(root / "dps2")
    got = load_params(root / "reduce_bf16" / f"checkpoints/step-{STEPS:06d}")
    matrices = [k for k in init if init[k].dim() == 2]
    assert matrices
    beyond_fp32 = []
    for k in matrices:
        want, path = steps[-1][k].double(), [init[k].double()] + [s[k].double() for s in steps]
        err = (got[k].double() - want).abs().max().item()
        moved = (want - path[0]).abs().max().item()
        fp32_bound = STEPS * EPS * want.abs().max().item() + rtol(TOKENS, C_GRAD) * moved
        per_step = sum((b - a).abs().max().item() for a, b in zip(path, path[1:]))
        bf16_bound = C_VALUE * 2 * EPS_BF16 * per_step + fp32_bound
        assert err <= bf16_bound, (k, err, bf16_bound)
        beyond_fp32.append(err / fp32_bound)
    assert sorted(beyond_fp32)[len(beyond_fp32) // 2] > 10, beyond_fp32
    assert sum(r > 1 for r in beyond_fp32) >= 0.9 * len(matrices), dict(zip(matrices, beyond_fp32))


@pytest.mark.parametrize("name", ["param_bf16", "autocast_bf16"])
def test_bf16_forward_changes_the_gradient_norm_by_bf16_rounding(root, name):
    """The first step's gradient norm (the same weights and data): a bf16 forward and
    backward move it by more than an fp32 reordering can (tests/equivalence.py, C_GRAD)
    and by less than C_GRAD x eps_bf16 of its size. (The loss, a mean over 1024 tokens,
    averages the roundings away: measured 4e-6 relative, below fp32's bound.)"""
    fp32, bf16 = read_metrics(root / "dps2")[0]["grad_norm"], read_metrics(root / name)[0]["grad_norm"]
    assert rtol(TOKENS, C_GRAD) * fp32 < abs(bf16 - fp32) < C_GRAD * EPS_BF16 * fp32, (bf16, fp32)


def test_dtypes_resolve_as_documented():
    """auto keeps the old behaviour (bf16 parameters with fp32 reductions on a GPU, fp32 on
    the CPU); an explicit param_dtype sets an auto compute dtype; reduce auto is fp32."""
    from dist_train.config import TrainSection, resolve_dtypes

    assert resolve_dtypes(TrainSection(), "cuda") == ("bf16", "bf16", "fp32")
    assert resolve_dtypes(TrainSection(), "cpu") == ("fp32", "fp32", "fp32")
    assert resolve_dtypes(TrainSection(param_dtype="bf16"), "cpu") == ("bf16", "bf16", "fp32")
    assert resolve_dtypes(TrainSection(dtype="bf16", param_dtype="fp32"), "cpu") == ("bf16", "fp32", "fp32")
    assert resolve_dtypes(TrainSection(dtype="fp32", reduce_dtype="bf16"), "cuda") == ("fp32", "fp32", "bf16")


BAD = [
    (["train.param_dtype=fp16"], "train.param_dtype = 'fp16': must be one of 'auto', 'fp32', 'bf16'; did you mean "
                                 "'bf16'?"),
    (["train.reduce_dtype=float32"], "train.reduce_dtype = 'float32': must be one of 'auto', 'fp32', 'bf16'"),
    (["train.dtype=fp32", "train.param_dtype=bf16"], "train.param_dtype = 'bf16' with train.dtype = 'fp32': FSDP2 "
                                                     "computes with the parameters it gathers"),
    (["train.compile=true", "model.moe_experts=4"], "train.compile = true with model.moe_experts = 4: routing"),
    (["train.compile=true", "metrics.noise_scale=true"], "metrics.noise_scale = true with train.compile = true"),
    (["train.compile=true", "kernels.backend=triton"], "train.compile = true with kernels.backend = 'triton'"),
    (["train.compile_backend=eager"], "train.compile_backend = 'eager': must be one of 'inductor', 'aot_eager'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_precision_or_compile_setting_names_the_field_and_fix(overrides, message):
    from dist_train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/tiny.toml", overrides)
    assert message in str(e.value)


def test_bad_precision_setting_is_one_line_from_the_cli(tmp_path):
    """Refused before any rank starts: exit code 2, one line, no traceback."""
    overrides, message = BAD[2]
    sets = [a for o in overrides + [f"run.dir={tmp_path}"] for a in ("--set", o)]
    proc = run_cli("local", "--nproc", "2", "configs/tiny.toml", *sets, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dist-train: error: ") and message in lines[0], lines


def test_bf16_on_a_gpu_without_it_is_refused_naming_the_field():
    """bf16 compute on a pre-Ampere GPU (each rank checks its device at start): one line
    naming the field that asked for bf16 and the fix."""
    from dist_train.config import ConfigError, load_config
    from dist_train.layout import check_device_dtypes

    v100 = dict(capability=(7, 0), name="Tesla V100-SXM2-16GB")
    cases = [([], "train.dtype = 'auto' (bf16 on a GPU): Tesla V100-SXM2-16GB (compute capability 7.0) has no "
                  "bf16 arithmetic (it needs compute capability 8.0, Ampere, or newer); set train.dtype = 'fp32'"),
             (["train.param_dtype=bf16"], "train.param_dtype = 'bf16': Tesla V100"),
             (["train.dtype=bf16"], "train.dtype = 'bf16': Tesla V100")]
    for overrides, message in cases:
        cfg = load_config(REPO / "configs/tiny.toml", overrides)
        with pytest.raises(ConfigError) as e:
            check_device_dtypes(cfg, "cuda", **v100)
        assert message in str(e.value)
        check_device_dtypes(cfg, "cuda", capability=(8, 0), name="A100")  # Ampere: fine
        check_device_dtypes(cfg, "cpu")
    fp32 = load_config(REPO / "configs/tiny.toml", ["train.dtype=fp32", "train.reduce_dtype=bf16"])
    check_device_dtypes(fp32, "cuda", **v100)  # fp32 compute: nothing in bf16 to run


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("name", [*LAYOUTS, "dps2_inductor"])
def test_compiled_blocks_train_as_eager(root, name):
    """Every step's loss and gradient norm within 1e-5 (relative) of the eager run; the
    compile time is the first record's compile_s, in no other record."""
    eager = name.split("_")[0]
    got, want = read_metrics(root / (name if name.endswith("inductor") else f"{name}_compiled")), read_metrics(
        root / eager)
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm"):
            assert abs(g[key] - w[key]) <= 1e-5 * abs(w[key]), (name, g["step"], key, g[key], w[key])
    assert got[0]["compile_s"] > 0 and all("compile_s" not in r for r in got[1:] + want)


def test_compiling_keeps_the_modules_and_names():
    """torch.compile replaces each block's forward, nothing else: the same modules and
    parameter names (checkpoints, init seeds, FSDP units); the runs above show the numbers."""
    from dist_train.model import Block, ModelArgs, Transformer
    from dist_train.parallelize import apply_compile

    a = ModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_dim=32, max_seq_len=8)
    model = Transformer(a)
    names = [n for n, _ in model.named_parameters()]
    apply_compile(model, "aot_eager")
    assert [n for n, _ in model.named_parameters()] == names
    assert all(type(b) is Block and "forward" in vars(b) for b in model.layers.values())
