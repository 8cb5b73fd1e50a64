"""The training loop of one rank: build mesh, data, model and optimizer; step; checkpoint.

The order follows TorchTitan's: resolve `ParallelDims` from the config and the world
size, build the one device mesh, build the model on the meta device, apply each
parallelism's `parallelize` function with the mesh it needs (pipeline split, tensor
parallel, FSDP2 / HSDP; see parallelize.py), materialise, initialise
layout-independently, then train.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from dist_train import kernels
from dist_train.fault.collectives import get_recorder, name_mesh_groups
from dist_train.data import DistributedBatchSampler, TokenDataset, ensure_prepared
from dist_train.parallel.clip import clip_grad_norm_
from dist_train.parallel.data_parallel import set_gradient_sync
from dist_train.parallel.dims import ParallelDims
from dist_train.parallel.tensor_parallel import check_tp_shapes

from .c4 import start_monitor
from .checkpoint import Checkpointer
from .config import Config, ConfigError
from .distributed import RankEnv, init_distributed, pick_device
from .metrics import COMM_KINDS, MetricsWriter, peak_memory_bytes
from . import moe
from .model import ModelArgs, count_params
from .parallelize import check_moe, check_pipeline, parallelize

def parallel_dims(cfg: Config, world_size: int, local_world_size: int | None = None) -> ParallelDims:
    """The layout for this world size, refusing what this version cannot run yet.
    `local_world_size` (ranks per node) lets the hierarchical all-to-all be checked."""
    p = cfg.parallel
    if cfg.diloco.enabled:
        raise ConfigError("diloco.enabled = true: DiLoCo is not available yet in this version; set it to false")
    dims = ParallelDims.resolve(world_size, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard,
                                tp=p.tp, pp=p.pp, ep=p.ep, diloco=cfg.diloco.replicas)
    check_moe(cfg, dims, local_world_size)
    if dims.tp > 1:  # the vocabulary is checked once the tokenizer is known
        a = ModelArgs.from_config(cfg.model, cfg.data.seq_len, tokenizer_vocab=1)
        check_tp_shapes(dims.tp, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, ffn_dim=a.ffn_dim,
                        vocab_size=cfg.model.vocab_size or None)
    t = cfg.train
    if t.global_batch % (dims.dp_size * t.micro_batch):
        raise ConfigError(
            f"train.global_batch = {t.global_batch} must be divisible by dp x micro_batch = "
            f"{dims.dp_size} x {t.micro_batch} = {dims.dp_size * t.micro_batch} "
            f"(dp = dp_replicate x dp_shard = {dims.dp_replicate} x {dims.dp_shard}); "
            f"set train.global_batch to a multiple of {dims.dp_size * t.micro_batch}")
    check_pipeline(cfg, dims, t.global_batch // (dims.dp_size * t.micro_batch))
    return dims


def check_run_dir(cfg: Config) -> None:
    """With checkpoint.resume = "none", refuse a run directory that already holds a run:
    starting over there would overwrite its metrics and checkpoints."""
    run_dir = cfg.run_dir
    if cfg.checkpoint.resume == "none" and ((run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()):
        raise ConfigError(f"run directory {run_dir} already holds a run and checkpoint.resume = 'none'; "
                          "choose a new run.name, or set checkpoint.resume = 'latest' to continue it")


def write_resolved_config(cfg: Config, start_step: int) -> None:
    """Write run_dir/config.toml; a resumed run with another config keeps the old one
    as config.before-step-NNNNNN.toml."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path, text = cfg.run_dir / "config.toml", cfg.to_toml()
    if path.exists() and path.read_text() != text:
        path.rename(path.with_name(f"config.before-step-{start_step:06d}.toml"))
    path.write_text(text)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def lr_lambda(cfg: Config):
    t = cfg.train

    def fn(step: int) -> float:  # step = optimizer steps already taken
        if t.warmup and step < t.warmup:
            return (step + 1) / t.warmup
        progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_optimizer(cfg: Config, model: torch.nn.Module):
    t = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, foreach=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env = RankEnv.from_environ()
        self.device = pick_device(self.env)
        self.owns_process_group = not dist.is_initialized()  # later runs of a sweep reuse it
        if self.owns_process_group:
            init_distributed(self.env, self.device)
        self.recorder = get_recorder()
        self.rank = dist.get_rank()
        self.dims = parallel_dims(cfg, dist.get_world_size(), self.env.local_world_size)
        self.mesh, self.dp_mesh = self.dims.build_mesh(self.device.type)
        name_mesh_groups(self.mesh)
        kernels.set_default_backend(cfg.kernels.backend)
        self.run_dir = cfg.run_dir
        self.c4 = None  # the C4 monitor while fit() runs (dist_train/c4.py)
        self._setup_data()
        self._setup_model()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, log=self.log)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ---- setup --------------------------------------------------------------------------
    def _setup_data(self) -> None:
        d = self.cfg.data
        shard_dir = None
        if self.rank == 0:  # one rank prepares the bundled corpus; the others wait, then read
            shard_dir = ensure_prepared(d.source, d.cache_dir or None, d.tokenizer)
        with self.recorder.paused():
            box = [str(shard_dir) if shard_dir else None]
            dist.broadcast_object_list(box, src=0)
        self.dataset = TokenDataset(box[0], d.seq_len)
        self.sampler = DistributedBatchSampler(
            len(self.dataset), global_batch=self.cfg.train.global_batch, micro_batch=self.cfg.train.micro_batch,
            dp_size=self.dp_mesh.size(), dp_rank=self.dp_mesh.get_local_rank(), seed=self.cfg.run.seed)

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.args = ModelArgs.from_config(cfg.model, cfg.data.seq_len, self.dataset.vocab_size)
        self.dtype = compute_dtype(cfg, self.device)
        self.par = parallelize(self.args, cfg, self.dims, self.mesh, self.device,
                               param_dtype=self.dtype if self.dtype != torch.float32 else None,
                               n_micro=self.sampler.num_micro_batches)
        self.model = self.par.view
        # scaled like the loss: by 1 / micro-batches here, or by the pipeline schedule after backward
        pipelined = self.par.schedule is not None
        moe.set_aux_grad_scale(self.par.parts, 1.0 if pipelined else 1.0 / self.sampler.num_micro_batches,
                               pipelined=pipelined)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        # A one-rank job has no FSDP to cast for it: autocast gives it the same mixed precision.
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 and not self.dims.fsdp_enabled else nullcontext())

    # ---- state --------------------------------------------------------------------------
    def resume(self) -> int:
        path = self.checkpointer.find_resumable(self.cfg.checkpoint.resume)
        if path is None:
            return 0
        with self.recorder.paused():
            state = self.checkpointer.load(path, self.model, self.optimizer)
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.log(f"resumed from {path} at step {state['step']}")
        return state["step"]

    def save(self, step: int) -> None:
        state = {"sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "layout": self.dims.describe(), "world_size": self.dims.world_size}
        with self.recorder.paused(), (self.c4.busy("checkpoint") if self.c4 else nullcontext()):
            path = self.checkpointer.save(step, self.model, self.optimizer, state)
        self.log(f"saved {path}")

    # ---- one step -----------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches; returns (local mean loss, grad norm).
        Ranks without the last pipeline stage return a NaN loss (they compute none)."""
        micro_batches = [self.dataset.batch(idx) for idx in self.sampler.next_step()]
        if self.par.schedule is not None:
            loss = self._pipeline_step(micro_batches)
        else:
            loss = self._accumulate(micro_batches)
        grad_norm = clip_grad_norm_(list(self.model.parameters()), self.cfg.train.grad_clip,
                                    pp_group=self.par.pp_group)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _accumulate(self, micro_batches) -> torch.Tensor:
        """Plain (depth-first) gradient accumulation: each micro-batch through the whole model."""
        n = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        for i, (inputs, targets) in enumerate(micro_batches):
            set_gradient_sync(self.model, i == n - 1)
            with self.autocast:
                loss = self.model(inputs.to(self.device), targets.to(self.device)) / n
            loss.backward()
            loss_sum += loss.detach().float()
        return loss_sum

    def _pipeline_step(self, micro_batches) -> torch.Tensor:
        """The schedule splits this rank's batch back into the same micro-batches; it scales
        gradients by 1 / micro-batches itself."""
        inputs = torch.cat([x for x, _ in micro_batches]).to(self.device)
        targets = torch.cat([y for _, y in micro_batches]).to(self.device)
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.par.first else ()
        kwargs = dict(target=targets, losses=losses) if self.par.last else {}
        with self.autocast:
            self.par.schedule.step(*args, return_outputs=False, **kwargs)
        if not self.par.last:
            return torch.full((), float("nan"), device=self.device)
        return torch.stack([l.detach().float() for l in losses]).mean()

    def _gather_record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                       step_time: float) -> "_PendingRecord":
        """Start reducing this step's numbers over ranks: one all-gather, issued async and
        waited by `_finish_record` after the next step's compute, so the metrics add no
        synchronisation point of their own (not counted as the step's comm)."""
        comm = self.recorder.step_summary(reset=True)
        local = [loss.item(), float(peak_memory_bytes(self.device)), step_time, self._idle_s(step_time)]
        for kind in COMM_KINDS:
            local += [comm.get(kind, {}).get("count", 0), comm.get(kind, {}).get("bytes", 0)]
        moe_ids = self.args.moe_layer_ids()
        if moe_ids:
            local += moe.stats_vector(self.par.parts, moe_ids, self.args.moe_experts,
                                      self.par.ep_topology.stats.take() if self.par.ep_topology else {})
        mine = torch.tensor(local, dtype=torch.float64)
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        with self.recorder.background():
            work = dist.all_gather(rows, mine, async_op=True)
        return _PendingRecord(step, work, rows, self.scheduler.get_last_lr()[0], float(grad_norm))

    def _finish_record(self, p: "_PendingRecord") -> dict:
        """The step's metrics record, once its all-gather is done."""
        p.work.wait()
        table = torch.stack(p.rows)
        first = 4  # loss, memory, step time, idle; then (count, bytes) per comm kind; then MoE stats
        tokens = self.cfg.train.global_batch * self.cfg.data.seq_len
        step_time = float(table[:, 2].max())
        record = {
            "step": p.step,
            # each rank holding a loss (the last pipeline stage) has its data-parallel share's mean
            "loss": float(table[:, 0].nanmean()),
            "lr": p.lr,
            "tokens": tokens * p.step,
            "tokens_per_s": tokens / step_time,
            "grad_norm": p.grad_norm,
            "step_time_s": step_time,
            "peak_memory_bytes": int(table[:, 1].max()),
            "bubble_fraction": float((table[:, 3] / table[:, 2]).mean()),
            "comm": {kind: {"count": int(table[:, first + 2 * i].sum()),
                            "bytes": int(table[:, first + 1 + 2 * i].sum())}
                     for i, kind in enumerate(COMM_KINDS)},
        }
        moe_ids = self.args.moe_layer_ids()
        if moe_ids:
            micro_batches = self.sampler.global_batch // self.sampler.micro_batch  # over all dp ranks
            record["moe"] = moe.stats_record(table[:, first + 2 * len(COMM_KINDS):].sum(0), moe_ids,
                                             self.args.moe_experts, micro_batches)
        if self.c4:
            record["c4_findings"] = self.c4.findings_count
        return record

    def _idle_s(self, step_time: float) -> float:
        """Seconds of this step spent blocked in pipeline receives (the bubble), from the
        collective records; 0 without a pipeline."""
        if self.par.schedule is None:
            return 0.0
        since = time.monotonic_ns() - int(step_time * 1e9)
        waits = [r.t_exit - max(r.t_wait, r.t_enter) for r in self.recorder.records()
                 if r.op == "recv" and r.t_enter >= since and r.t_exit]
        return sum(waits) / 1e9

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> Path:
        cfg = self.cfg
        if self.rank == 0:
            check_run_dir(cfg)
        start = self.resume()
        writer = None
        if self.rank == 0:
            write_resolved_config(cfg, start)
            writer = MetricsWriter(self.run_dir, resume_step=start, tensorboard=cfg.metrics.tensorboard)
            nodes = self.env.world_size // self.env.local_world_size
            self.log(f"dist-train: {self.dims.describe()}, {self.env.world_size} rank(s) on {nodes} node(s) "
                     f"({self.device.type}), "
                     f"{count_params(self.args)['total'] / 1e6:.2f}M parameters, steps {start}..{cfg.train.steps}")
        progress = _progress(cfg, start) if self.rank == 0 else None
        self.recorder.step_summary(reset=True)  # start-up collectives are not a step's
        self.c4 = c4 = start_monitor(cfg, self.env, self.recorder, self.device, self.log)  # None when off
        pending = None  # the previous step's metrics, gathered while this step computes

        def publish(p: _PendingRecord) -> None:
            record = self._finish_record(p)
            if writer is not None and (p.step % cfg.metrics.log_every == 0 or p.step == cfg.train.steps):
                writer.write(record)
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                progress.update(1)

        try:
            for step in range(start + 1, cfg.train.steps + 1):
                t0 = time.perf_counter()
                if c4:
                    c4.step_begin(step)
                loss, grad_norm = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                current = self._gather_record(step, loss, grad_norm, time.perf_counter() - t0)
                if pending is not None:
                    publish(pending)
                pending = current
                if c4:
                    c4.step_end(step, time.perf_counter() - t0)
                every = cfg.checkpoint.every
                if every and (step % every == 0 or step == cfg.train.steps):
                    publish(pending)  # metrics.jsonl holds every step a checkpoint holds
                    pending = None
                    self.save(step)
            if pending is not None:
                publish(pending)
        finally:
            if c4:
                c4.close()
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()
        return self.run_dir

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


class _PendingRecord(NamedTuple):
    """A step's metrics on their way: the all-gather in flight and what is known locally."""
    step: int
    work: object  # torch.distributed Work
    rows: list
    lr: float
    grad_norm: float


def _progress(cfg: Config, start: int):
    if not cfg.metrics.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc=cfg.run.name, unit="step", dynamic_ncols=True)


def train(cfgs: list[Config]) -> list[Path]:
    """Run each config in turn in this job (one launch, one process group); the first
    run sets up the process group and the last tears it down."""
    trainers: list[Trainer] = []
    run_dirs = []
    try:
        for cfg in cfgs:
            trainer = Trainer(cfg)
            trainers.append(trainer)
            run_dir = trainer.fit()
            run_dirs.append(run_dir)
            if trainer.rank == 0:
                print(f"run directory: {run_dir}", flush=True)
                if cfg.metrics.report:
                    from .report import write_report

                    print(f"report: {write_report(run_dir)}", flush=True)
        return run_dirs
    finally:
        if trainers:
            trainers[0].close()
