"""Diagnostic for bench/dp_overhead.py: dist-train's steps and plain FSDP2 steps, interleaved.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \
        bench/_dp_paired.py [--pairs 20] [--block 2] [--root-reshard] [--plain-sync]

On a shared 2-core machine, separate runs of each system see different background load and
their tokens/s move by 10-30 % from run to run. Here the same 4 processes alternate blocks
of `--block` steps: dist-train's `Trainer.train_step` followed by its per-step metrics record
(`_gather_record`, finished after the next step as `fit` does), then the same number of plain FSDP2 steps on an identical
model and data over an unobserved gloo group, and so on; both see the same load. There is no
barrier between blocks, so each side keeps its own synchronisation (dist-train's record is an
async all-gather every step, waited one step later; the plain loop has none). Per block: each rank's wall and CPU time;
a step's time is the ranks' mean (each rank's blocks tile its timeline).

Switches for the plain side, to find what a gap is made of:
  --root-reshard  root `reshard_after_forward=True`, as dist-train did before 2026-11-23
                  (torch's default, None, keeps the root unsharded from forward to backward,
                  as dist-train does now)
  --plain-sync    one small all-gather after every step, like dist-train's metrics record
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import _dp_common as common


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=20, help="(dist-train block, plain block) pairs")
    p.add_argument("--block", type=int, default=2, help="steps per block")
    p.add_argument("--root-reshard", action="store_true", help="plain: root reshard_after_forward=True")
    p.add_argument("--plain-sync", action="store_true", help="plain: a small all-gather after every step")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()

    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from dist_train.config import load_config
    from dist_train.model import Transformer, init_weights, round_up
    from dist_train.trainer import Trainer

    steps = args.pairs * args.block
    spec = {"model": {"dim": args.dim, "n_layers": args.layers, "n_heads": 4, "n_kv_heads": 2,
                      "ffn_dim": round_up(int(8 * args.dim / 3), 64), "vocab_size": 320},
            "seq_len": 128, "global_batch": 16, "micro_batch": 2, "steps": steps, "lr": 3e-3, "warmup": 5,
            "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "seed": 1234}
    m = spec["model"]
    cfg = load_config("configs/tiny.toml", [
        f"model.dim={m['dim']}", f"model.n_layers={m['n_layers']}", f"model.n_heads={m['n_heads']}",
        f"model.n_kv_heads={m['n_kv_heads']}", f"model.ffn_dim={m['ffn_dim']}", f"model.vocab_size={m['vocab_size']}",
        f"train.steps={steps}", "train.dtype=fp32", f"run.dir={tempfile.mkdtemp(prefix='dp_paired-')}",
        "metrics.progress=false", "checkpoint.every=0"])
    trainer = Trainer(cfg)  # joins the job through dist-train's observed backend
    rank, world = dist.get_rank(), dist.get_world_size()

    plain_pg = dist.new_group(backend="gloo")  # a real, unobserved gloo group
    mesh = DeviceMesh.from_group(plain_pg, "cpu", mesh_dim_names=("dp_shard",))
    dataset, sampler = common.data(spec, rank, world)
    with torch.device("meta"):
        model = Transformer(common.model_args(spec))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if args.root_reshard else {}))
    model.to_empty(device="cpu")
    init_weights(model, spec["seed"])
    opt = torch.optim.AdamW(common.param_groups(model, spec["weight_decay"]), lr=spec["lr"],
                            betas=(spec["beta1"], spec["beta2"]), eps=1e-8, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, common.lr_factor(spec))

    def plain_step() -> None:
        t0 = time.perf_counter()
        micro_batches = sampler.next_step()
        k = len(micro_batches)
        loss_sum = torch.zeros(())
        for i, indices in enumerate(micro_batches):
            inputs, targets = dataset.batch(indices)
            model.set_requires_gradient_sync(i == k - 1)
            loss = model(inputs, targets) / k
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if args.plain_sync:
            mine = torch.tensor([loss_sum.item(), 0.0, time.perf_counter() - t0], dtype=torch.float64)
            dist.all_gather([torch.empty_like(mine) for _ in range(world)], mine, group=plain_pg)

    step, pending = 0, None

    def dist_train_step() -> None:  # as Trainer.fit runs a step, less the metrics file
        nonlocal step, pending
        step += 1
        t0 = time.perf_counter()
        loss, grad_norm = trainer.train_step()
        current = trainer._gather_record(step, loss, grad_norm, time.perf_counter() - t0)
        if pending is not None:
            trainer._finish_record(pending)
        pending = current

    wall = {"dist-train": [], "plain": []}
    cpu = {"dist-train": [], "plain": []}
    for i in range(args.pairs):
        order = [("dist-train", dist_train_step), ("plain", plain_step)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.block):
                fn()
            wall[name].append((time.perf_counter() - t0) / args.block)
            cpu[name].append((time.process_time() - c0) / args.block)
    trainer._finish_record(pending)
    rows = [None] * world
    dist.all_gather_object(rows, (wall, cpu), group=plain_pg)
    if rank == 0:
        skip = 2  # warm-up pairs
        w = {k: [statistics.mean(r[0][k][i] for r in rows) for i in range(skip, args.pairs)] for k in wall}
        c = {k: [sum(r[1][k][i] for r in rows) for i in range(skip, args.pairs)] for k in cpu}
        for k in wall:
            print(f"{k:10s} s/step: wall median {statistics.median(w[k]):.4f}, CPU of all ranks median "
                  f"{statistics.median(c[k]):.4f}")
        rw = [a / b for a, b in zip(w["dist-train"], w["plain"])]
        rc = [a / b for a, b in zip(c["dist-train"], c["plain"])]
        print(f"dist-train / plain step time, median over {args.pairs - skip} pairs of {args.block}-step blocks: "
              f"wall {statistics.median(rw):.3f}, CPU {statistics.median(rc):.3f} "
              f"(plain: root reshard_after_forward={'True' if args.root_reshard else 'default'}, "
              f"per-step all-gather {'on' if args.plain_sync else 'off'})")
    dist.barrier(group=plain_pg)
    trainer.close()


if __name__ == "__main__":
    main()
