"""The layout checks (tests/equivalence.py) pass what a correct layout does and fail what a
broken one does, in one process on the tiny model's real gradients: the same batch
reduced in another order (data-parallel shards averaged, micro-batches accumulated) must
pass; a gradient summed instead of averaged, a missing data-parallel reduction, and
gradient rows landing on the wrong shard must each fail."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO
from tests.equivalence import SGD, assert_params_match, assert_values_match

STEPS = 1
LR = SGD["train.lr"]


@pytest.fixture(scope="module")
def setup():
    from dist_train.config import load_config
    from dist_train.data import TokenDataset, ensure_prepared
    from dist_train.model import ModelArgs, Transformer, init_weights

    cfg = load_config(REPO / "configs/tiny.toml", [])
    data = TokenDataset(ensure_prepared("bundled", None, "byte"), cfg.data.seq_len)
    model = Transformer(ModelArgs.from_config(cfg.model, cfg.data.seq_len, data.vocab_size))
    init_weights(model, cfg.run.seed)
    inputs, targets = data.batch(list(range(8)))
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, inputs, targets, init


def _grads(model, parts) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss over `parts` (lists of (inputs, targets, weight)): each
    part's loss times its weight, accumulated."""
    model.zero_grad(set_to_none=True)
    for x, y, w in parts:
        (model(x, y) * w).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _sgd(init, grads, scale=1.0):
    return {k: init[k] - LR * scale * grads[k] for k in init}


def test_checks_pass_other_reduction_orders_and_fail_planted_layout_bugs(setup):
    model, x, y, init = setup
    n = x.shape[0] * x.shape[1]
    ref = _sgd(init, _grads(model, [(x, y, 1.0)]))
    # a correct data-parallel layout: 2 ranks of 4 samples, each in 2 micro-batches, averaged
    shards = [_grads(model, [(x[i:i + 2], y[i:i + 2], 0.5), (x[i + 2:i + 4], y[i + 2:i + 4], 0.5)]) for i in (0, 4)]
    good = {k: (shards[0][k] + shards[1][k]) / 2 for k in init}
    assert_params_match(_sgd(init, good), ref, init, STEPS, n, "averaged shards")

    planted = {
        "gradients summed over 2 ranks instead of averaged": _sgd(init, good, scale=2.0),
        "one rank's gradient only (a missing reduction)": _sgd(init, shards[0]),
        "micro-batch losses not divided by their count": _sgd(
            init, _grads(model, [(x[:4], y[:4], 1.0), (x[4:], y[4:], 1.0)])),
    }
    wrong_shard = dict(good)
    w = good["layers.0.attention.wq.weight"]
    wrong_shard["layers.0.attention.wq.weight"] = torch.cat([w[w.shape[0] // 2:], w[:w.shape[0] // 2]])
    planted["tp shards of one projection in the wrong order"] = _sgd(init, wrong_shard)
    for bug, params in planted.items():
        with pytest.raises(AssertionError):
            assert_params_match(params, ref, init, STEPS, n, bug)
            pytest.fail(f"not caught: {bug}")


def test_value_check_scale():
    """A loss a layout reduced in another order (relative 1e-7) passes; one that moved by
    1e-4 relative does not."""
    assert_values_match([5.0000005], [5.0], 2048, "loss")
    with pytest.raises(AssertionError):
        assert_values_match([5.0005], [5.0], 2048, "loss")
