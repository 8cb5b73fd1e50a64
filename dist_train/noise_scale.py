"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training", appendix A), measured at no extra collective.

For a batch of B samples, E|G_B|^2 = |G|^2 + tr(Sigma) / B (G the true gradient, Sigma the
per-sample gradient covariance), so squared gradient norms at two batch sizes B_small <
B_big give unbiased estimates of both:

    |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each estimate is noisy, so both are smoothed by an exponential moving average and the
noise scale is the ratio of the two averages (the paper's and OpenAI's recommendation;
the average of the ratio would be biased). With both averages started at zero their
bias corrections cancel in the ratio.

What the two batches are here (dist_train/trainer.py):

- B_small = train.micro_batch. Each micro-batch's backward is its own autograd call (plain
  accumulation, and every pipeline schedule), and a tensor hook on a parameter sees the
  gradient that call adds, before it is accumulated: |g_j|^2 of micro-batch j, on the
  parameters this rank computes with. Under FSDP2 those are the unsharded parameters, and
  gradient sync is off until a step's last micro-batch, so nothing in a hook has been
  reduced over ranks yet: each rank sees its own micro-batches' full gradients (not a
  dp-mean; that would be B_small = micro_batch x dp if gradients were reduce-scattered
  after every micro-batch, which this trainer does not do). A pipeline stage sees its own
  layers' piece; the squares of the pieces add up over pp. Every rank sums its squares
  over its micro-batches (one float in the step stats the trainer gathers anyway), and
  the mean over all micro-batches of the step is the sum over ranks / (global_batch /
  micro_batch): the same micro-batches in any layout, so any dp or pp gives the
  single-process figure.
- B_big = train.global_batch (per DiLoCo replica: global_batch / replicas): the
  accumulated, reduced gradient whose norm the clipping computes anyway (before clipping).
- Loss scaling: plain accumulation divides each micro-batch's loss by the number of
  micro-batches n, so a hook sees g_j / n (squares scaled back by n^2); pipeline schedules
  scale gradients after the backward, so there a hook sees g_j itself.
- Not available (null): with one micro-batch in the whole step (B_small = B_big); under
  tp > 1 (a sequence-parallel or tp-replicated weight's per-micro-batch gradient is a
  partial sum over the tp ranks, whose norm needs a collective) and ep > 1 (an expert's
  gradient on a rank already holds tokens of its whole ep group). Never a made-up figure.

Cost when on: one norm of every parameter's gradient per micro-batch (a read of the
gradient, no copy) and a Python hook call per parameter per micro-batch; no collective,
no extra memory. Off by default (`metrics.noise_scale`).
"""
from __future__ import annotations

import math
import weakref

import torch


class MicroBatchSquares:
    """Sum over a step's micro-batches of |g_j|^2 for the parameters that `modules` compute
    with, from tensor hooks on them (each sees one backward call's gradient before it is
    accumulated). `scale` undoes the loss scaling: hooks see g_j / scale."""

    def __init__(self, modules, scale: float = 1.0):
        self.scale = float(scale)
        self._sum: torch.Tensor | None = None
        self._hooked: dict[int, weakref.ref] = {}
        self._handles = []
        for part in modules:
            for m in part.modules():
                # at forward time a module's parameters are the ones autograd will see
                # (FSDP2 has swapped in the unsharded ones by then)
                self._handles.append(m.register_forward_pre_hook(self._hook_params))

    def _hook_params(self, module, args) -> None:
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            ref = self._hooked.get(id(p))
            if ref is not None and ref() is p:
                continue
            self._hooked[id(p)] = weakref.ref(p)
            self._handles.append(p.register_hook(self._on_grad))

    def _on_grad(self, grad: torch.Tensor) -> None:
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        sq = torch.linalg.vector_norm(local, dtype=torch.promote_types(local.dtype, torch.float32)).double().square()
        self._sum = sq if self._sum is None else self._sum + sq

    def take(self) -> float:
        """This step's sum of |g_j|^2 (0 if no backward ran), and start the next step's."""
        total = 0.0 if self._sum is None else float(self._sum) * self.scale ** 2
        self._sum = None
        return total

    def close(self) -> None:
        """Remove every hook (on the modules and on the parameters)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased (|G|^2, tr(Sigma)) from the mean squared gradient norm at batch b_small and
    the squared norm at b_big (b_small < b_big)."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScale:
    """B_simple from each step's two squared norms: the raw estimates, their EMAs (factor
    `beta`), and the ratio of the EMAs (None while either is not positive: no figure)."""

    def __init__(self, b_small: int, b_big: int, beta: float, unavailable: str | None = None):
        self.b_small, self.b_big, self.beta = b_small, b_big, beta
        self.unavailable = unavailable or (
            None if b_big > b_small else f"one micro-batch per step (global batch {b_big} = micro-batch "
                                         f"{b_small}): no smaller batch to compare with")
        self.ema_g2 = self.ema_trace = 0.0

    def update(self, small_sq: float, big_sq: float) -> dict:
        """The record's fields for one step (`noise_scale`, and `noise` with the raw numbers)."""
        if self.unavailable:
            return {"noise_scale": None, "noise": None}
        g2, trace = estimates(small_sq, big_sq, self.b_small, self.b_big)
        if math.isfinite(g2) and math.isfinite(trace):  # a non-finite step would poison every later one
            self.ema_g2 = self.beta * self.ema_g2 + (1 - self.beta) * g2
            self.ema_trace = self.beta * self.ema_trace + (1 - self.beta) * trace
        value = self.ema_trace / self.ema_g2 if self.ema_g2 > 0 and self.ema_trace > 0 else None
        return {"noise_scale": value,
                "noise": {"b_small": self.b_small, "b_big": self.b_big, "small_sq": small_sq, "big_sq": big_sq,
                          "grad_sq": g2, "trace_cov": trace}}

    def state_dict(self) -> dict:
        return {"ema_g2": self.ema_g2, "ema_trace": self.ema_trace}

    def load_state_dict(self, state: dict) -> None:
        self.ema_g2, self.ema_trace = float(state["ema_g2"]), float(state["ema_trace"])
