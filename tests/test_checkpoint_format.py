"""The optimizer's on-disk format, in one process (a one-rank gloo group): the flattened
format round-trips every group's hyper-parameters and moments, and a checkpoint written
in the earlier unflattened format still loads. (Pipeline stages resuming with their own
groups is tested through real ranks in test_pp_equivalence.)"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from dist_train.checkpoint import TRAIN_STATE, Checkpointer


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model_and_optimizer(lr: float = 1e-2, betas=(0.9, 0.95)):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=betas)
    return model, opt


def _trained():
    model, opt = _model_and_optimizer()
    for _ in range(2):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _assert_same_optimizer(got, want):
    for g, w in zip(got.param_groups, want.param_groups, strict=True):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in w.items() if k != "params"}
    for pg, pw in zip([p for g in got.param_groups for p in g["params"]],
                      [p for g in want.param_groups for p in g["params"]], strict=True):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got.state[pg][k], want.state[pw][k])


def test_flattened_round_trip(one_rank, tmp_path):
    model, opt = _trained()
    path = Checkpointer(tmp_path / "ck", keep=2, log=lambda m: None).save(2, model, opt, {"sampler": {}})
    fresh, fresh_opt = _model_and_optimizer(lr=1.0, betas=(0.5, 0.5))  # every value must come from disk
    Checkpointer(tmp_path / "ck", keep=2).load(path, fresh, fresh_opt)
    _assert_same_optimizer(fresh_opt, opt)
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_unflattened_checkpoint_still_loads(one_rank, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _trained()
    path = tmp_path / "step-000002"
    model_sd, optim_sd = get_state_dict(model, opt)  # the earlier format: default options
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    (path / TRAIN_STATE).write_text(json.dumps({"step": 2}))
    fresh, fresh_opt = _model_and_optimizer(lr=1.0, betas=(0.5, 0.5))
    assert Checkpointer(tmp_path, keep=2).load(path, fresh, fresh_opt)["step"] == 2
    _assert_same_optimizer(fresh_opt, opt)
