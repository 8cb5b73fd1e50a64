"""Baseline (b) of bench/dp_overhead.py: DeepSpeed ZeRO stage 3 on the same model and data.

    DS_BUILD_OPS=0 python -m torch.distributed.run --standalone --nproc-per-node 4 \
        bench/_dp_deepspeed.py --spec '{...}' --result out.json

DeepSpeed's CPU accelerator falls back to gloo when oneCCL is absent. The optimizer is a
client torch AdamW (no DeepSpeed optimizer op to build), wrapped by ZeRO-3; gradient
accumulation, loss scaling by 1/accumulation steps and gradient clipping are DeepSpeed's.
`stage3_param_persistence_threshold` is 0 so every parameter is partitioned, as FSDP2
shards every parameter: at the default (1e5 elements) each tensor of the bench model
would stay whole on every rank and ZeRO-3 would not shard parameters at all.
"""
from __future__ import annotations

import os
import warnings

import torch

import _dp_common as common


def main() -> None:
    spec, result = common.parse_args()
    os.environ.setdefault("DS_BUILD_OPS", "0")
    # ZeRO-3 calls torch's deprecated all_gather_into_tensor / reduce_scatter_tensor names,
    # which warn on every step under torch 2.13; keep the log (and its cost) out of the timing.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from dist_train.model import Transformer, init_weights

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset, sampler = common.data(spec, rank, world)

    model = Transformer(common.model_args(spec))
    init_weights(model, spec["seed"])  # every rank draws the same full weights; ZeRO-3 partitions them
    # The head's weight is read by the root's forward (the fused loss), not by calling
    # `model.output`: tell ZeRO-3 to gather it for the root.
    deepspeed.zero.register_external_parameter(model, model.head_weight())

    opt = torch.optim.AdamW(common.param_groups(model, spec["weight_decay"]), lr=spec["lr"],
                            betas=(spec["beta1"], spec["beta2"]), eps=1e-8, foreach=spec["foreach"])
    accumulation = spec["global_batch"] // (spec["micro_batch"] * world)
    config = {
        "train_batch_size": spec["global_batch"],
        "train_micro_batch_size_per_gpu": spec["micro_batch"],
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": spec["grad_clip"],
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=config,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, common.lr_factor(spec)))

    timer = common.StepTimer()
    for _ in range(spec["steps"]):
        timer.start()
        micro_batches = sampler.next_step()
        assert len(micro_batches) == accumulation
        loss_sum = torch.zeros(())
        for indices in micro_batches:
            inputs, targets = dataset.batch(indices)
            loss = engine(inputs, targets)
            engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
            engine.step()  # optimizer step (clip, AdamW, schedule) only at the boundary
            loss_sum += loss.detach() / accumulation
        timer.stop(loss_sum.item())
    timer.finish("DeepSpeed ZeRO-3", spec, result, {"deepspeed_version": deepspeed.__version__,
                                                     "deepspeed_comm_backend": dist.get_backend()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
