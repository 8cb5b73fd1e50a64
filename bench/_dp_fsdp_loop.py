"""Baseline (a) of bench/dp_overhead.py: a plain torch training loop with FSDP2.

    python -m torch.distributed.run --standalone --nproc-per-node 4 bench/_dp_fsdp_loop.py \
        --spec '{...}' --result out.json

Plain `dist.init_process_group("gloo")`, `fully_shard` on each block and at the root
(as parallel/data_parallel.py does), gradient accumulation that reduces only on the last
micro-batch, `torch.nn.utils.clip_grad_norm_`, torch AdamW. No metrics, no collective
recording, no checkpointing: the floor dist-train's overhead is measured against.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import _dp_common as common


def main() -> None:
    spec, result = common.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))

    from dist_train.model import Transformer, init_weights

    dataset, sampler = common.data(spec, rank, world)
    with torch.device("meta"):
        model = Transformer(common.model_args(spec))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    init_weights(model, spec["seed"])

    opt = torch.optim.AdamW(common.param_groups(model, spec["weight_decay"]), lr=spec["lr"],
                            betas=(spec["beta1"], spec["beta2"]), eps=1e-8, foreach=spec["foreach"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, common.lr_factor(spec))

    timer = common.StepTimer()
    for _ in range(spec["steps"]):
        timer.start()
        micro_batches = sampler.next_step()
        n = len(micro_batches)
        loss_sum = torch.zeros(())
        for i, indices in enumerate(micro_batches):
            inputs, targets = dataset.batch(indices)
            model.set_requires_gradient_sync(i == n - 1)
            loss = model(inputs, targets) / n
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        timer.stop(loss_sum.item())
    timer.finish("torch FSDP2 loop", spec, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
