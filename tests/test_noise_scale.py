"""The gradient noise scale (dist_train/noise_scale.py).

In one process: the hooks see each micro-batch's own gradient (under the loss scaling of
plain accumulation and with activation checkpointing), and on linear regression with
Gaussian inputs and noise, where |G|^2 and tr(Sigma) are known in closed form, the
estimator lands within 20% of the true B_simple. Through gloo (one launch of 2 ranks and
one of 1): the field is in metrics.jsonl, finite and positive, and FSDP, pipeline and
single-process runs of the same global batch agree within float32 rounding, a resumed
run goes on with the same averages, under tp it is null; W&B's offline history holds the same
keys as metrics.jsonl.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import struct

import pytest
import torch

from dist_train.noise_scale import MicroBatchSquares, NoiseScale, estimates
from tests.conftest import read_metrics, sweep
from tests.equivalence import C_GRAD, SGD, rtol


def brute_force_squares(model, batches) -> float:
    """sum_j |grad of micro-batch j's mean loss|^2, each from its own autograd.grad call."""
    total = 0.0
    for x, y in batches:
        grads = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), list(model.parameters()))
        total += sum(float(g.double().square().sum()) for g in grads)
    return total


@pytest.mark.parametrize("checkpoint", [False, True])
def test_hooks_see_each_micro_batch_gradient(checkpoint):
    """Accumulating n micro-batches of loss / n (the trainer's plain accumulation), the
    hooks' sum, scaled back by n^2, is sum_j |g_j|^2; not the accumulated gradient's norm."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    n = 4
    batches = [(torch.randn(5, 8), torch.randn(5, 3)) for _ in range(n)]
    squares = MicroBatchSquares([model], scale=n)
    for x, y in batches:
        out = (torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False) if checkpoint else model(x))
        (torch.nn.functional.mse_loss(out, y) / n).backward()
    got = squares.take()
    assert squares.take() == 0.0  # taken: the next step starts from nothing
    squares.close()  # its hooks gone: the reference's own gradients below are not counted
    want = brute_force_squares(model, batches)
    assert squares.take() == 0.0
    accumulated = sum(float(p.grad.double().square().sum()) for p in model.parameters())
    assert abs(got - want) <= 2 * rtol(16 * 5, C_GRAD) * want, (got, want)
    assert abs(accumulated * n * n - want) > 0.1 * want  # the micro-batches' gradients differ: a real check


def linear_regression_run(d: int, delta_sq: float, noise_var: float, b_small: int, n_micro: int, steps: int,
                          beta: float, seed: int = 0):
    """Least squares 1/2 (x.w - y)^2 with x ~ N(0, I_d), y = x.w* + N(0, noise_var), at a fixed
    w = w* + delta: the per-sample gradient is x (x.delta - e), so G = delta and
    Sigma = (|delta|^2 + noise_var) I + delta delta^T (Gaussian fourth moments), i.e.
    tr(Sigma) = d (|delta|^2 + noise_var) + |delta|^2. Returns the estimator (after `steps`
    steps of n_micro micro-batches of b_small, accumulated as the trainer does) and the
    per-step raw estimates."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    delta = torch.randn(d, generator=g, dtype=torch.float64)
    delta *= math.sqrt(delta_sq) / delta.norm()
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    squares = MicroBatchSquares([model], scale=n_micro)
    ns = NoiseScale(b_small, b_small * n_micro, beta)
    raw = []
    for _ in range(steps):
        for _ in range(n_micro):
            x = torch.randn(b_small, d, generator=g, dtype=torch.float64)
            y = x @ w_star + math.sqrt(noise_var) * torch.randn(b_small, generator=g, dtype=torch.float64)
            (0.5 * (model(x)[:, 0] - y).square().mean() / n_micro).backward()
        rec = ns.update(squares.take() / n_micro, float(model.weight.grad.square().sum()))
        raw.append((rec["noise"]["grad_sq"], rec["noise"]["trace_cov"]))
        model.weight.grad = None
    return rec, raw, delta_sq, d * (delta_sq + noise_var) + delta_sq


@pytest.mark.parametrize("d,delta_sq,noise_var", [(32, 1.0, 1.0), (8, 1.0, 0.0), (64, 1.0, 1.0)])
def test_estimator_on_known_covariance(d, delta_sq, noise_var):
    """B_simple = tr(Sigma) / |G|^2 of the last EMA within 20% of the closed form (true
    values 65, 9 and 129: at, below and above B_big = 64), and the per-step raw estimates
    unbiased (their means over 300 steps within 15%). Over 12 seeds each, the largest
    errors were 6.5% and 7.1%."""
    rec, raw, g2_true, trace_true = linear_regression_run(d, delta_sq, noise_var, b_small=8, n_micro=8,
                                                          steps=300, beta=0.99)
    true = trace_true / g2_true
    err = rec["noise_scale"] / true - 1
    print(f"d={d} |G|^2={g2_true} noise={noise_var}: B_simple {rec['noise_scale']:.2f} vs {true:.2f} ({err:+.1%})")
    assert abs(err) < 0.2
    mean_g2 = sum(r[0] for r in raw) / len(raw)
    mean_trace = sum(r[1] for r in raw) / len(raw)
    assert abs(mean_g2 / g2_true - 1) < 0.15 and abs(mean_trace / trace_true - 1) < 0.15, (mean_g2, mean_trace)


def test_noise_scale_arithmetic():
    """The two estimates invert E|G_B|^2 = |G|^2 + tr/B exactly; the EMAs' ratio (no
    figure while |G|^2's average is not positive); one batch size gives null."""
    g2, tr = 3.0, 40.0
    assert estimates(g2 + tr / 2, g2 + tr / 16, 2, 16) == pytest.approx((g2, tr), rel=1e-12)
    ns = NoiseScale(2, 16, beta=0.5)
    assert ns.update(g2 + tr / 2, g2 + tr / 16)["noise_scale"] == pytest.approx(tr / g2, rel=1e-12)
    assert NoiseScale(2, 16, 0.5).update(10.0, 1.0)["noise_scale"] is None  # |G|^2 estimate < 0
    one = NoiseScale(2, 2, 0.9)
    assert one.unavailable and one.update(1.0, 1.0) == {"noise_scale": None, "noise": None}


# ---- the trainer through gloo ----------------------------------------------------------------

STEPS = 4
HAVE_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 1-rank launch (the reference, a resumed run) and one 2-rank launch
    (FSDP dp_shard=2, logging to W&B offline if installed; a 1F1B pipeline over 2 stages;
    tp=2). SGD without clipping, 4 steps, global batch 16 of micro-batches of 2."""
    root = tmp_path_factory.mktemp("noise")
    common = {"train.steps": STEPS, "metrics.noise_scale": "true", "metrics.noise_scale_ema": 0.5,
              "data.verify": "off", **SGD}
    # "resumed": 2 steps and a checkpoint, then continued to 4 from it (the averages with it)
    sweep(root, 1, {"ref": {}, "resumed": {"train.steps": 2, "checkpoint.every": 2},
                    "resumed ": {"checkpoint.every": 2}}, common)
    two = {"fsdp": {"parallel.dp_shard": 2}, "pp": {"parallel.pp": 2, "parallel.dp_shard": 1},
           "tp": {"parallel.tp": 2, "parallel.dp_shard": 1}}
    if HAVE_WANDB:  # the FSDP run logs to W&B too (offline)
        two["fsdp"].update({"metrics.wandb": "true", "metrics.wandb_mode": "offline",
                            "metrics.wandb_project": "noise-test", "metrics.wandb_tags": '["ci"]'})
    with pytest.MonkeyPatch.context() as mp:  # W&B's own folders under the test's, not the user's
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(root / var.lower()))
        sweep(root, 2, two, common)
    return root


def noise_bound(ref: dict, n_tokens: int) -> float:
    """How far B_simple may move when the two squared norms it is made of each carry
    float32 rounding: a gradient entry differs by rtol(n, C_GRAD) of its scale, a squared
    norm by twice that; the differences the estimator takes (tr ~ small - big) amplify it
    by small / (small - big), which the bound keeps (relative error of S plus that of |G|^2)."""
    e = 2 * rtol(n_tokens, C_GRAD)
    n = ref["noise"]
    bs, bb, small, big = n["b_small"], n["b_big"], n["small_sq"], n["big_sq"]
    d_trace = e * (small + big) / (1 / bs - 1 / bb)
    d_g2 = e * (bb * big + bs * small) / (bb - bs)
    return d_trace / abs(n["trace_cov"]) + d_g2 / abs(n["grad_sq"])


def test_noise_scale_in_metrics_and_layout_independent(runs):
    ref = read_metrics(runs / "ref")
    n_tokens = 16 * 128
    for r in ref:
        assert r["noise_scale"] is not None and math.isfinite(r["noise_scale"]) and r["noise_scale"] > 0, r
        assert r["noise"]["big_sq"] == pytest.approx(r["grad_norm"] ** 2, rel=1e-12)
        assert (r["noise"]["b_small"], r["noise"]["b_big"]) == (2, 16)
    for name in ("resumed", "fsdp", "pp"):
        got = read_metrics(runs / name)
        assert len(got) == STEPS
        # the EMAs' ratio, step by step, against the reference's (each step's bound from its own numbers;
        # an EMA mixes steps with positive weights, so the worst step's bound covers it)
        worst = 0.0
        for a, b in zip(got, ref):
            for key in ("small_sq", "big_sq"):  # the inputs: the same micro-batches' squared norms
                assert abs(a["noise"][key] - b["noise"][key]) <= 2 * rtol(n_tokens, C_GRAD) * b["noise"][key], \
                    (name, key, a["step"], a["noise"][key], b["noise"][key])
            worst = max(worst, noise_bound(b, n_tokens))
            assert abs(a["noise_scale"] - b["noise_scale"]) <= worst * b["noise_scale"], \
                (name, a["step"], a["noise_scale"], b["noise_scale"], worst)
    for r in read_metrics(runs / "tp"):
        assert r["noise_scale"] is None and r["noise"] is None


def test_report_draws_noise_scale(runs):
    from dist_train.report import write_report

    out = write_report(runs / "ref")
    assert (out / "noise_scale.png").stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert 'alt="noise_scale"' in page and "gradient noise scale B_simple (last)" in page
    last = read_metrics(runs / "ref")[-1]["noise_scale"]
    assert f"{last:.3g} samples" in page


def read_wandb_history(run_file) -> tuple[list[dict], dict]:
    """History rows and the run record of a W&B offline `.wandb` file, without network or
    wandb's API: a LevelDB-style log (7-byte file header, 32 KiB blocks, each record a
    7-byte header of crc, length and type (full / first / middle / last) before its
    bytes) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, chunks, rows, run = 32768, 7, b"", [], None
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            which = rec.WhichOneof("record_type")
            if which == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif which == "run":
                run = rec.run
    return rows, run


def flat_keys(record: dict, prefix: str = "") -> set:
    out = set()
    for k, v in record.items():
        out |= flat_keys(v, f"{prefix}{k}/") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return out


@pytest.mark.skipif(not HAVE_WANDB, reason="needs the wandb extra")
def test_wandb_offline_history_has_metrics_keys(runs):
    """Rank 0 alone logged: one offline run whose history rows carry exactly metrics.jsonl's
    keys (nested dicts flattened with "/") and values, at the records' steps."""
    run_dir = runs / "fsdp"
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    rows, run = read_wandb_history(files[0])
    records = read_metrics(run_dir)
    assert run.project == "noise-test" and run.display_name == "fsdp" and list(run.tags) == ["ci"]
    assert run.run_id == (run_dir / "wandb" / "run_id").read_text().strip()
    assert [r["_step"] for r in rows] == [r["step"] for r in records]
    for row, rec in zip(rows, records):
        assert {k for k in row if not k.startswith("_")} == flat_keys(rec)
        assert row["loss"] == rec["loss"] and row["noise_scale"] == rec["noise_scale"]
        assert row["comm/all_gather/count"] == rec["comm"]["all_gather"]["count"]


def test_wandb_missing_names_the_extra(monkeypatch):
    """Without the package, preflight (before any rank starts) stops with one line naming
    the extra; with metrics.wandb off nothing is asked for."""
    import importlib.util

    from dist_train.config import ConfigError, load_config
    from dist_train.layout import check_extras

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^metrics.wandb = true needs the wandb package: pip install "
                                          r"'dist-train\[wandb\]', or set metrics.wandb = false$"):
        check_extras(load_config("configs/tiny.toml", ["metrics.wandb=true"]))
    check_extras(load_config("configs/tiny.toml", []))
