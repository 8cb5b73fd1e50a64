"""What "the same as the single-process reference" means, in float32, for every layout test.

A layout changes the order of floating-point reductions (shards summed, then all-reduced;
GEMMs split over tp; micro-batches piped), and CPUs differ in how they block their own
GEMMs (AVX2, AVX-512, AMX), so results differ from the reference in the last bits. The
bounds below come from the float32 epsilon and the sizes summed, not from what one CPU
produced:

- a value that is one reduction of n terms after a forward pass (a step's mean loss over
  n tokens) differs by about eps * sqrt(n) of its size (rounding errors of a sum in
  another order add up like a random walk); c = 4 allows for the few reductions in front
  of it (logits over dim, the log-sum-exp over the vocabulary);
- a gradient passes through about 4x more reductions (forward and backward, each layer's
  matmuls and norms), c = 16, relative to the largest entry of its tensor: an entry near
  zero carries the rounding of its large terms (which cancel), so it is compared on the
  tensor's scale, not its own.

Parameters are compared after SGD steps (`SGD`: no momentum, no clipping), where
p_T = p_0 - sum_t lr_t g_t, so a parameter carries its gradients' errors linearly. AdamW
divides each gradient by its own running rms: an entry whose gradient is near zero (a
rare token's embedding row) turns a rounding difference into an lr-sized step, which is
how a 3-step AdamW comparison came to fail on an AVX-512 + AMX machine (4.3e-6 on one of
20480 embedding entries, 2.8e-4 relative) while passing elsewhere. Compared after SGD, a
real layout bug still fails by orders of magnitude: a gradient scaled by 2 (a sum for a
mean, a micro-batch count missed) moves the displacement p_T - p_0 by 100%, a missing
reduction or a wrong shard by O(1) (tests/test_equivalence_checks.py plants each).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

EPS = torch.finfo(torch.float32).eps
SGD = {"train.optimizer": "sgd", "train.lr": 0.1, "train.grad_clip": 0.0}
C_VALUE, C_GRAD = 4.0, 16.0


def rtol(n: int, c: float) -> float:
    """Relative bound for a result that sums n terms in another order (module docstring)."""
    return c * EPS * math.sqrt(n)


def tokens_per_step(cfg) -> int:
    return cfg.train.global_batch * cfg.data.seq_len


def assert_values_match(got: list[float], ref: list[float], n: int, what: str, c: float = C_VALUE) -> None:
    """Per-step scalars (loss: c = C_VALUE; gradient norm: C_GRAD) against the reference's."""
    assert len(got) == len(ref), f"{what}: {len(got)} steps vs the reference's {len(ref)}"
    tol = rtol(n, c)
    for step, (a, b) in enumerate(zip(got, ref), 1):
        assert abs(a - b) <= tol * abs(b), f"{what} step {step}: {a!r} vs {b!r} (bound {tol:.2e} relative)"


def assert_params_match(got: dict, ref: dict, init: dict, steps: int, n: int, what: str = "") -> None:
    """Parameters after `steps` SGD steps, each tensor on its own scale: its displacement
    from the initial weights carries the gradients' error (C_GRAD), and every step rounds
    the update into the parameter once more (steps x eps x |p|)."""
    assert got.keys() == ref.keys(), f"{what}: parameter names differ: {sorted(got.keys() ^ ref.keys())}"
    for k in ref:
        a, b, p0 = got[k].double(), ref[k].double(), init[k].double()
        assert a.shape == b.shape, f"{what} {k}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        moved = (b - p0).abs().max().item()
        bound = steps * EPS * b.abs().max().item() + rtol(n, C_GRAD) * moved
        err = (a - b).abs().max().item()
        assert err <= bound, (f"{what} {k}: differs by {err:.3e}, more than {bound:.3e} "
                              f"(the reference moved it by {moved:.3e} from its initial value)")


def metric(run_dir: Path, key, steps: int) -> list:
    """A metric of the first `steps` records of a run; `key` a field name or a function of the record."""
    import json

    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [key(r) if callable(key) else r[key] for r in records][:steps]


LOSS_AND_NORM = (("loss", "loss", C_VALUE), ("grad_norm", "grad_norm", C_GRAD))


def assert_run_matches(run_dir: Path, ref_dir: Path, steps: int, n: int, values=LOSS_AND_NORM) -> dict:
    """A layout's run against its reference run: every step's `values` ((what, key, c)
    triples; losses and gradient norms by default), and the parameters at `steps`. Returns
    the reference's parameters."""
    name = Path(run_dir).name
    for what, key, c in values:
        assert_values_match(metric(run_dir, key, steps), metric(ref_dir, key, steps), n, f"{name} {what}", c=c)
    ckpt = f"checkpoints/step-{steps:06d}"
    want = load_params(Path(ref_dir) / ckpt)
    assert_params_match(load_params(Path(run_dir) / ckpt), want, initial_params(ref_dir), steps, n, name)
    return want


def load_params(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The model parameters of a DCP checkpoint, as full tensors, without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt_dir.parent / f"{ckpt_dir.name}.pt"
    if not out.exists():
        dcp_to_torch_save(ckpt_dir, out)
    return dict(torch.load(out, weights_only=False)["model"])


def initial_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """A run's weights before its first step (init is layout-independent and seeded)."""
    from dist_train.config import load_config
    from dist_train.data import TokenDataset, ensure_prepared
    from dist_train.model import ModelArgs, Transformer, init_weights

    cfg = load_config(run_dir / "config.toml", [])
    data = TokenDataset(ensure_prepared(cfg.data.source, cfg.data.cache_dir or None, cfg.data.tokenizer),
                        cfg.data.seq_len, cfg.data.tokenizer)
    model = Transformer(ModelArgs.from_config(cfg.model, cfg.data.seq_len, data.vocab_size))
    init_weights(model, cfg.run.seed)
    return {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("rope")}


def read_config(run_dir: Path):
    from dist_train.config import load_config

    return load_config(run_dir / "config.toml", [])
