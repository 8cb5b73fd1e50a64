"""The training loop of one rank: build mesh, data, model and optimizer; step; checkpoint.

The order follows TorchTitan's: check the layout (dist_train/layout.py), build the one
device mesh from the `ParallelDims`, build the model on the meta device, apply each
parallelism's `parallelize` function with the mesh it needs (pipeline split, tensor
parallel, experts, FSDP2 / HSDP; see parallelize.py), materialise, initialise
layout-independently, then train.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import zlib
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from dist_train import kernels
from dist_train.data import (BackgroundVerifier, DataError, DistributedBatchSampler, MixtureDataset, MixtureSampler,
                             TokenDataset, prepare_sources)
from dist_train.fault.collectives import get_recorder, name_mesh_groups
from dist_train.fault.membership import MembershipLost
from dist_train.parallel.elastic import ShapeRefused
from dist_train.parallel.clip import clip_grad_norm_
from dist_train.parallel.data_parallel import set_gradient_sync
from dist_train.parallel.dims import MESH_DIMS
from dist_train.parallel.diloco import MeshReplicaComm, OuterLoop
from dist_train.parallel.tensor_parallel import reduce_partial_grads

from . import moe
from .c4 import start_monitor
from .checkpoint import Checkpointer
from .config import Config, ConfigError, resolve_dtypes
from .distributed import RankEnv, init_distributed, pick_device
from .failures import PeerLost, peer_lost
from .heap_peak import HeapPeak
from .layout import preflight
from .metrics import GatheredStats, MetricsLog, MetricsWriter, StepStats, peak_allocated_bytes, peak_memory_bytes
from .mfu import device_name, mfu, peak_flops
from .model import ModelArgs, count_params, flops_per_token
from .noise_scale import MicroBatchSquares, NoiseScale
from .parallelize import diloco_fragments, parallelize
from .schedules import lr_factor
from .topology import LINK_CLASSES, build_topology, describe, place, simulate_wanted, topology_given, write_placement

# mesh groups whose traffic metrics report by name (`comm_by_dim`); others count as "other"
COMM_GROUPS = MESH_DIMS + ("ep", "edp", "batch", "replica", "world", "other")


def write_resolved_config(cfg: Config, start_step: int) -> None:
    """Write run_dir/config.toml; a resumed run with another config keeps the old one
    as config.before-step-NNNNNN.toml."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path, text = cfg.run_dir / "config.toml", cfg.to_toml()
    if path.exists() and path.read_text() != text:
        path.rename(path.with_name(f"config.before-step-{start_step:06d}.toml"))
    path.write_text(text)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_dtypes(cfg: Config, device: torch.device) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(compute, param, reduce) dtypes of this run on `device` (config.resolve_dtypes)."""
    return tuple(DTYPES[d] for d in resolve_dtypes(cfg.train, device.type))


def lr_lambda(cfg: Config):
    t = cfg.train

    def fn(step: int) -> float:  # step = optimizer steps already taken
        return lr_factor(t.schedule, step, t.steps, t.warmup, t.min_lr_ratio, t.decay_ratio)

    return fn


def build_optimizer(cfg: Config, model: torch.nn.Module):
    """AdamW (or plain SGD), weight decay on matrices only, and the LR schedule."""
    t = cfg.train
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, foreach=True)
    else:
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, foreach=True)
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
        self.run_dir = cfg.run_dir
        sources = self._prepare_data()  # [(name, resolved)]: data.source, or every source of data.mix
        nodes = self.env.world_size // self.env.local_world_size
        self.dims = preflight([cfg], self.env.world_size, nodes, shard_dirs=[sources[0][1]],
                              device=self.device.type).runs[0].dims
        self._place(nodes)
        self.mesh, self.batch_mesh = self.dims.build_mesh(
            self.device.type, None if self.placement.identity else self.placement.tensor())
        name_mesh_groups(self.mesh)
        kernels.set_default_backend(cfg.kernels.backend)
        datasets = [TokenDataset(d, cfg.data.seq_len, tokenizer=cfg.data.tokenizer) for _, d in sources]
        self.source_names = [name for name, _ in sources] if cfg.data.mix else []
        self.dataset = MixtureDataset(self.source_names, datasets) if cfg.data.mix else datasets[0]
        self.n_train = len(self.dataset) - self._held_out()
        self.eos_id = self._document_eos()
        # each rank fully checks every world-th shard once, while training runs
        n_shards = len(self.dataset.shards.paths)
        self.verifier = (BackgroundVerifier(self.dataset.shards, range(self.rank, n_shards, self.env.world_size))
                         if cfg.data.verify == "background" else None)
        # an elastic replica draws its own sequence of the data (replicas come and go)
        seed = cfg.run.seed if not cfg.elastic.lighthouse else (cfg.run.seed * 1_000_003 + zlib.crc32(
            cfg.elastic.replica_id.encode())) % 2**31
        batching = dict(global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                        dp_size=self.batch_mesh.size(), dp_rank=self.batch_mesh.get_local_rank(), seed=seed)
        self.sampler = (MixtureSampler(self.dataset.sizes, [cfg.data.mix[n] for n in self.source_names], **batching)
                        if cfg.data.mix else DistributedBatchSampler(self.n_train, **batching))
        self._setup_model()
        self.outer = self._setup_outer() if cfg.diloco.enabled else None
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, log=self.log,
                                         async_mode=cfg.checkpoint.async_, fault_inject=cfg.fault.inject)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ---- setup --------------------------------------------------------------------------
    def _place(self, nodes: int) -> None:
        """The topology (if any) and the rank placement (dist_train/topology.py): printed and
        written to placement.json; with a topology every op is counted by link class, and
        under `dist-train local` the slow classes are simulated."""
        from dist_train.fault.inject import LinkModel

        t = self.cfg.topology
        self.topology = build_topology(t, self.env.world_size, nodes) if topology_given(t) else None
        self.placement = place(self.cfg.parallel.placement, self.dims.shape, self.topology, self.dims.ep)
        rec = self.recorder
        rec.hooks[:] = [h for h in rec.hooks if not isinstance(getattr(h, "__self__", None), LinkModel)]
        rec.link_of = None
        if self.topology is None:
            return
        cache: dict = {}
        topo = self.topology

        def link_of(ranks: tuple) -> str:
            c = cache.get(ranks)
            if c is None:
                c = cache[ranks] = topo.group_link(ranks)
            return c

        rec.link_of = link_of
        links = topo.simulated_links()
        if links and simulate_wanted(t):
            rec.hooks.append(LinkModel(link_of, links).hook)
        if self.rank == 0:
            for line in describe(self.placement, topo):
                print(line, flush=True)
            if links and simulate_wanted(t):
                print("topology: simulating " + ", ".join(
                    f"{c} ({lat * 1e3:g} ms, {bps * 8 / 1e9:g} Gbit/s)" if bps else f"{c} ({lat * 1e3:g} ms)"
                    for c, (lat, bps) in links.items()), flush=True)
            write_placement(self.run_dir, self.placement, topo)

    def _prepare_data(self) -> list[tuple[str, str]]:
        """One rank prepares the sources (the bundled corpus, file globs) if needed; the others
        wait, then read."""
        box = [prepare_sources(self.cfg.data) if self.rank == 0 else None]
        with self.recorder.paused():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.args = ModelArgs.from_config(cfg.model, cfg.data.seq_len, self.dataset.vocab_size)
        self.dtype, param_dtype, reduce_dtype = run_dtypes(cfg, self.device)
        self.flops_per_token = flops_per_token(self.args, cfg.data.seq_len)
        self.peak_flops = peak_flops(device_name(self.device), self.dtype)  # None (MFU n/a) off the table
        if cfg.train.compile:  # each run of a sweep compiles afresh (its compile_s is its own)
            torch._dynamo.reset()
        self.par = parallelize(self.args, cfg, self.dims, self.mesh, self.device,
                               param_dtype=param_dtype if param_dtype != torch.float32 else None,
                               reduce_dtype=reduce_dtype, n_micro=self.sampler.num_micro_batches)
        self.model = self.par.view
        if cfg.model.init_from:  # pretrained weights over the seeded init, into this layout's shards
            from .interop.hf_import import load_hf_weights

            with self.recorder.paused():
                load_hf_weights(self.model, cfg.model.init_from, self.args)
        # scaled like the loss: by 1 / micro-batches here, or by the pipeline schedule after backward
        pipelined = self.par.schedule is not None
        moe.set_aux_grad_scale(self.par.parts, 1.0 if pipelined else 1.0 / self.sampler.num_micro_batches,
                               pipelined=pipelined)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        # CPU: the live-allocation peak, sampled at the blocks (CUDA's allocator keeps its own)
        self.heap = HeapPeak() if self.device.type == "cpu" else None
        if self.heap is not None and self.heap.available:
            self.heap.watch(self.model, inside_blocks=not cfg.train.compile)
        self.noise, self.grad_squares = self._setup_noise_scale(pipelined) if cfg.metrics.noise_scale else (None, None)
        # Forward runs in the dtype of the parameters it sees: FSDP2's gathered ones (param_dtype),
        # or without FSDP the fp32 weights themselves. Where that is not the compute dtype
        # (a one-rank or tp-only job in bf16; fp32 gathers under bf16 compute), autocast casts.
        seen = param_dtype if self.dims.fsdp_enabled else torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != seen else nullcontext()

    def _setup_noise_scale(self, pipelined: bool):
        """The gradient noise scale (dist_train/noise_scale.py): hooks summing each micro-batch's
        squared gradient norm on this rank (plain accumulation scales each loss by 1 / n; a
        pipeline schedule scales gradients after the backward instead), and the estimator."""
        t, d = self.cfg.train, self.dims
        why = None
        if d.tp > 1:
            why = (f"parallel.tp = {d.tp}: a sequence-parallel or tp-replicated weight's per-micro-batch gradient is "
                   "a partial sum over the tp ranks, whose norm would need a collective")
        elif d.ep > 1:
            why = f"parallel.ep = {d.ep}: an expert's gradient on a rank already sums its whole ep group's tokens"
        noise = NoiseScale(t.micro_batch, t.global_batch // d.diloco, self.cfg.metrics.noise_scale_ema, why)
        if noise.unavailable:
            self.log(f"metrics.noise_scale: not available here ({noise.unavailable}); noise_scale is null")
            return noise, None
        scale = 1.0 if pipelined else float(self.sampler.num_micro_batches)
        return noise, MicroBatchSquares(self.par.parts, scale)

    def _document_eos(self) -> int | None:
        """The token that ends a document, with data.document_mask; None without."""
        if not self.cfg.data.document_mask:
            return None
        eos = self.dataset.eos_id
        if eos is None or not 0 <= eos < self.dataset.vocab_size:
            raise DataError(f"data.document_mask = true needs the tokenizer's EOS id to find the documents, but "
                            f"{self.dataset.dir} has eos_id = {eos}; set data.tokenizer to one with an EOS token or "
                            "data.document_mask = false")
        return eos

    def _docs(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """The document ids of a batch's packed rows (data.document_mask), else None. Every rank
        reads its own batch's tokens, so every pipeline stage and tp rank computes them itself."""
        return None if self.eos_id is None else kernels.document_ids(inputs, self.eos_id).to(self.device)

    def _held_out(self) -> int:
        """Samples at the end of the data kept for evaluation ([eval]), never trained on."""
        if not self.cfg.eval.every:
            return 0
        n = self.cfg.eval.batches * self.cfg.train.global_batch
        if n >= len(self.dataset):
            raise DataError(f"eval.batches = {self.cfg.eval.batches} x train.global_batch = {self.cfg.train.global_batch} "
                            f"= {n} samples held out leaves nothing to train on ({len(self.dataset)} samples in "
                            f"{self.dataset.dir}); lower eval.batches or prepare more data")
        return n

    def _setup_outer(self) -> OuterLoop:
        """DiLoCo's outer loop over this rank's parameters; its replica group links the
        ranks holding the same shard in every replica (the mesh's diloco dim)."""
        d = self.cfg.diloco
        inner = self.dims.replica_mesh(self.mesh).get_group()
        if self.cfg.elastic.lighthouse:
            comm = self._elastic_comm(inner)
        else:
            comm = MeshReplicaComm(self.mesh["diloco"].get_group(), inner)
        return OuterLoop(diloco_fragments(self.model, self.args.n_layers, d.fragments), comm,
                         inner_steps=d.inner_steps, outer_lr=d.outer_lr, momentum=d.outer_momentum,
                         quantize=d.quantize, overlap=d.overlap, mix=d.mix, offload=d.offload,
                         reject_factor=d.reject_factor, deferred=self.recorder.deferred, tamper=self._bad_update())

    def _elastic_comm(self, inner):
        """The outer loop's traffic over a changing set of replica jobs (parallel/elastic.py):
        rank 0 hosts this replica's store for torchft's manager (a new one per attempt, so
        a restarted job never meets the last attempt's keys)."""
        from dist_train.fault.membership import Membership
        from dist_train.parallel.elastic import ElasticReplicaComm

        e = self.cfg.elastic
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")  # this job's first host: the other replicas reach it
        self._ft_store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False) if self.rank == 0 else None
        box = [self._ft_store.port if self.rank == 0 else None]
        with self.recorder.paused():
            dist.broadcast_object_list(box, src=0)
        membership = Membership(e.lighthouse, e.replica_id, self.rank, self.env.world_size, store_host=host,
                                store_port=box[0], min_replicas=e.min_replicas, quorum_timeout_s=e.quorum_timeout_s,
                                timeout_s=e.timeout_s, heartbeat_s=e.heartbeat_s, hostname=host)
        self._membership = membership
        from dist_train.fault.inject import parse_specs

        slow = [i.ms / 1e3 for i in parse_specs(self.cfg.fault.inject) if i.kind == "slow_exchange"]
        a, d = self.args, self.dims
        shape = {"world size": d.world_size, "parallel.pp": d.pp, "parallel.dp_replicate": d.dp_replicate,
                 "parallel.dp_shard": d.dp_shard, "parallel.tp": d.tp, "parallel.ep": d.ep, "model.n_layers": a.n_layers,
                 "model.dim": a.dim, "model.n_heads": a.n_heads, "model.n_kv_heads": a.n_kv_heads,
                 "model.ffn_dim": a.ffn_dim, "model.vocab_size": a.vocab_size, "model.moe_experts": a.moe_experts}
        return ElasticReplicaComm(membership, inner, e.replica_id, recorder=self.recorder, log=self.log,
                                  delay_s=sum(slow), shape=shape)

    def _join(self, start: int) -> int:
        """An elastic replica takes part in the live replicas' next round before its first
        step; if it was behind it healed from one of them and continues from their step
        (its own data sequence moved there, its inner optimizer state fresh)."""
        stats = self.outer.join(start)
        if stats.healed_step is None:
            return start
        step = stats.healed_step
        self._move_to(step)
        self.optimizer.state.clear()
        self.healed = (step, stats.healed_from)
        return step

    def _move_to(self, step: int) -> None:
        """Go on from `step` after healing from a replica there: the data sequence and the
        learning rate move with it."""
        self.sampler.seek(step)
        sd = self.scheduler.state_dict()
        self.scheduler.load_state_dict({**sd, "last_epoch": step, "_step_count": step + 1})
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr

    def _catch_up(self, outer, step: int) -> int:
        """A straggler: the live replicas' quorum went a round without it, and it healed from
        one a round ahead in this outer step. It goes on from the source's step (those inner
        steps it did not compute are the source's), keeping its inner optimizer state."""
        if outer is None or outer.healed_step is None or outer.healed_step <= step:
            return step
        self.log(f"DiLoCo: step {step}: healed from replica {outer.healed_from}, a round ahead; going on from "
                 f"its step {outer.healed_step}")
        self._move_to(outer.healed_step)
        return outer.healed_step

    def _bad_update(self):
        """A `bad_update` drill fault for this rank (fault/inject.py), as the outer loop's tamper."""
        from dist_train.fault.inject import parse_specs

        mine = [i for i in parse_specs(self.cfg.fault.inject) if i.kind == "bad_update" and i.rank == self.rank]
        if not mine:
            return None
        inj, fired = mine[0], []

        def tamper(step: int, flat: torch.Tensor) -> torch.Tensor:
            if step < inj.step or fired:
                return flat
            fired.append(step)
            print(f"fault injection: rank {self.rank} sends its pseudo-gradient x {inj.scale:g} at step {step}",
                  file=sys.stderr, flush=True)
            return flat * inj.scale if inj.scale == inj.scale else torch.full_like(flat, float("nan"))

        return tamper

    # ---- state --------------------------------------------------------------------------
    def resume(self) -> int:
        path = self.checkpointer.find_resumable(self.cfg.checkpoint.resume)
        if path is None:
            return 0
        extra = None
        if self.outer:  # its counters first, then its tensors load in place (parallel/diloco.py)
            self.outer.set_meta(self.checkpointer.train_state(path)["diloco"])
            extra = {"diloco": self.outer.tensors()}
        with self.recorder.paused():
            state = self.checkpointer.load(path, self.model, self.optimizer, replica=self._replica(), extra=extra)
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.noise is not None and "noise_scale" in state:  # its averages go on where they were
            self.noise.load_state_dict(state["noise_scale"])
        self.log(f"resumed from {path} at step {state['step']}")
        return state["step"]

    def save(self, step: int, c4) -> None:
        state = {"sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "layout": self.dims.describe(), "world_size": self.dims.world_size}
        if self.noise is not None:
            state["noise_scale"] = self.noise.state_dict()
        with self.recorder.paused(), c4.busy("checkpoint"):  # peers wait for rank 0 here, legitimately
            extra = None
            if self.outer:
                state["diloco"] = self.outer.meta()
                extra = {"diloco": self.outer.tensors()}
            path = self.checkpointer.save(step, self.model, self.optimizer, state, replica=self._replica(), extra=extra)
        if path is not None:  # else written in the background: finish_save completes it
            self.log(f"saved {path}")

    def finish_save(self, c4, gathered=None) -> None:
        """Complete a background save: at once without `gathered` (waiting for it), else
        when the gathered step stats show every rank's write on disk. Every rank sees the
        same stats, so all decide alike, with no collective of their own."""
        pending = self.checkpointer.pending
        if pending is None or (gathered is not None and not (
                "ckpt_written" in gathered and bool((gathered.column("ckpt_step") == pending.step).all())
                and bool((gathered.column("ckpt_written") == 1).all()))):
            return
        with self.recorder.paused(), c4.busy("checkpoint"):
            self.checkpointer.finish()

    def _replica(self) -> int | None:
        """This rank's DiLoCo replica (checkpoints keep each replica's own model and optimizer)."""
        return self.mesh["diloco"].get_local_rank() if self.outer else None

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def _compile(self) -> float:
        """train.compile: compile the blocks before the first step, so that step's
        step_time_s is a step's. One forward and backward of this rank's micro-batches of
        a dummy batch (token 0 everywhere, the shapes of training's), its gradients then
        dropped: no data drawn, no optimizer step, its collectives no step's. Returns the
        seconds it took on this rank (all of a step's work with it, and the wait in its
        collectives for ranks still compiling): the first record's compile_s."""
        t0 = time.perf_counter()
        zeros = torch.zeros(self.cfg.train.micro_batch, self.cfg.data.seq_len, dtype=torch.long)
        micro_batches = [(zeros, zeros)] * self.sampler.num_micro_batches
        with self.recorder.paused():
            (self._pipeline_step if self.par.schedule is not None else self._accumulate)(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.log(f"torch.compile ({self.cfg.train.compile_backend}): blocks compiled in {seconds:.1f} s before the "
                 "first step (the first record's compile_s, not in its step_time_s)")
        return seconds

    # ---- one step -----------------------------------------------------------------------
    @property
    def norm_by_stage(self) -> bool:
        """Pipelined and not clipping: the gradient norm is only reported, so no stage waits
        for the others' squares (under placement = auto that all-reduce over pp would be the
        one collective crossing clusters); each rank measures its stages' norm and
        `_grad_norm` adds the stages' squares up from the gathered metrics."""
        return self.cfg.train.grad_clip == 0 and self.par.pp_group is not None and self.dims.pp > 1

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches; returns (local mean loss, grad
        norm: the model's, or this rank's stages' if `norm_by_stage`). Ranks without the last
        pipeline stage return a NaN loss (they compute none)."""
        micro_batches = [self.dataset.batch(idx) for idx in self.sampler.next_step()]
        loss = (self._pipeline_step if self.par.schedule is not None else self._accumulate)(micro_batches)
        self._sample_heap()
        params = list(self.model.parameters())
        reduce_partial_grads(params)
        pp_group = None if self.norm_by_stage else self.par.pp_group
        grad_norm = clip_grad_norm_(params, self.cfg.train.grad_clip, pp_group=pp_group)
        self.optimizer.step()
        self._sample_heap()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _sample_heap(self) -> None:
        if self.heap is not None:
            self.heap.sample()

    def _accumulate(self, micro_batches) -> torch.Tensor:
        """Plain (depth-first) gradient accumulation: each micro-batch through the whole model."""
        n = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        for i, (inputs, targets) in enumerate(micro_batches):
            set_gradient_sync(self.model, i == n - 1)
            with self.autocast:
                loss = self._forward(inputs, targets) / n
            loss.backward()
            self._sample_heap()
            loss_sum += loss.detach().float()
        return loss_sum

    def _pipeline_step(self, micro_batches, train: bool = True) -> torch.Tensor:
        """The schedule splits this rank's batch back into the same micro-batches; it scales
        gradients by 1 / micro-batches itself (`train=False`: forward only, an evaluation)."""
        inputs = torch.cat([x for x, _ in micro_batches]).to(self.device)
        targets = torch.cat([y for _, y in micro_batches]).to(self.device)
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.par.first else ()
        kwargs = dict(target=targets, losses=losses) if self.par.last else {}
        docs = self._docs(inputs)
        if docs is not None:  # a keyword reaches every stage, split into the same micro-batches
            kwargs["docs"] = docs
        with self.autocast:
            if train:
                self.par.schedule.step(*args, return_outputs=False, **kwargs)
            else:
                self.par.schedule.eval(*args, **kwargs)
        if not self.par.last:
            return torch.full((), float("nan"), device=self.device)
        return torch.stack([l.detach().float() for l in losses]).mean()

    # ---- metrics ------------------------------------------------------------------------
    def step_stats(self, loss: torch.Tensor, step_time: float, eval_loss: float, grad_norm: float = 0.0) -> StepStats:
        """This rank's numbers for the step just taken (metrics.py gathers them)."""
        stats = StepStats()
        stats.add("loss", loss.item())
        stats.add("grad_sq", grad_norm ** 2)  # the model's squared norm, or this rank's stages' (norm_by_stage)
        stats.add("grad_replica", self.mesh["diloco"].get_local_rank())
        if self.grad_squares is not None:  # the noise scale's small-batch squares (dist_train/noise_scale.py)
            stats.add("gns_small_sq", self.grad_squares.take())  # sum over this rank's micro-batches
        stats.add("eval_loss", eval_loss)
        stats.add("peak_memory_bytes", peak_memory_bytes(self.device))
        stats.add("peak_allocated_bytes", peak_allocated_bytes(self.device, self.heap))
        stats.add("step_time_s", step_time)
        stats.add("idle_s", self._idle_s(step_time))
        if self.outer is not None:  # after an outer step every replica holds the same global state
            stats.add("diloco_digest", self.outer.digest() if self.outer.stats.applied else -1)
        v = self.verifier
        stats.add("data_bad_shard", -1 if v is None or v.bad_shard is None else v.bad_shard)
        stats.add("data_verify_s", -1 if v is None or v.seconds is None else v.seconds)  # -1: still checking
        if self.cfg.checkpoint.async_ != "off":  # the background save's progress, and waits for it
            ck = self.checkpointer
            stats.add("ckpt_step", ck.pending.step if ck.pending else -1)
            stats.add("ckpt_written", ck.written())
            stats.add("ckpt_wait_s", ck.wait_s)
            ck.wait_s = 0.0
        groups: dict = {}
        for name, c in self.recorder.group_summary(reset=True).items():
            into = groups.setdefault(name if name in COMM_GROUPS else "other", dict.fromkeys(c, 0))
            for f, v in c.items():
                into[f] += v
        stats.add_comm(self.recorder.step_summary(reset=True), groups, COMM_GROUPS)
        links = self.recorder.link_summary(reset=True)
        if self.topology is not None:
            stats.add_links(links, LINK_CLASSES)
        if self.args.moe_experts:
            topo = self.par.ep_topology
            moe.add_stats(stats, self.par.parts, self.args.moe_layer_ids(), self.args.moe_experts,
                          topo.stats.take() if topo is not None else {})
        return stats

    def build_record(self, step: int, g: GatheredStats, local: dict) -> dict:
        """The step's metrics.jsonl record from every rank's stats. A damaged shard found by
        any rank's verifier stops every rank here, at the same step, naming the file."""
        bad = int(g.column("data_bad_shard").max())
        if bad >= 0:
            raise DataError(f"data.source: {self.dataset.shards.paths[bad]} fails its full check (crc32 or token "
                            f"range), found while training at step {step}; the run stops rather than train on "
                            "damaged tokens; re-run `dist-train prepare` for it (`dist-train verify "
                            f"{self.dataset.dir}` checks every shard)")
        tokens = self.cfg.train.global_batch * self.cfg.data.seq_len
        step_time = float(g.column("step_time_s").max())
        record = {
            "step": step,
            # each rank holding a loss (the last pipeline stage) has its data-parallel share's mean
            "loss": float(g.column("loss").nanmean()),
            "lr": local["lr"],
            "tokens": tokens * step,
            "tokens_per_s": tokens / step_time,
            "mfu": mfu(tokens / step_time, self.flops_per_token, self.dims.world_size, self.peak_flops),
            "grad_norm": self._grad_norm(g) if self.norm_by_stage else local["grad_norm"],
            **self._noise_record(g),
            "step_time_s": step_time,
            "peak_memory_bytes": int(g.column("peak_memory_bytes").max()),
            "peak_allocated_bytes": int(g.column("peak_allocated_bytes").max()),
            "bubble_fraction": float((g.column("idle_s") / g.column("step_time_s")).mean()),
            "comm": g.comm(),
            "comm_by_dim": g.comm_by_dim(),
        }
        if self.topology is not None:  # per link class (dist_train/topology.py), by kind
            record["comm_by_link"] = g.comm_by_link()
        if local["source_counts"] is not None:  # data.mix: tokens so far per source (like "tokens")
            record["tokens_by_source"] = {name: n * self.cfg.data.seq_len
                                          for name, n in zip(self.source_names, local["source_counts"])}
        if "ckpt_wait_s" in g:  # the step waited this long for the previous background save
            record["checkpoint_wait_s"] = float(g.column("ckpt_wait_s").max())
        if not bool(g.column("eval_loss").isnan().all()):  # evaluated this step (the last stages hold it)
            record["eval_loss"] = float(g.column("eval_loss").nanmean())
        record["time"] = local["time"]
        if local["outer"] is not None:
            record.update(self._outer_record(local["outer"], step))
            record["outer_s"] = local["outer_s"]  # of step_time_s: the outer step's share (quorum, healing, exchange)
            if local["healed"]:
                record["healed_from"] = local["healed"][1]
            if step == self.joined[0] + 1:
                record["join_s"] = self.joined[1]  # waiting for the first quorum (and healing) before this step
            if local["outer"].applied:  # the same shard (rank modulo a replica's ranks) agrees in every replica
                # rows by rank; in mesh order (diloco outermost) whatever the placement
                digests = g.column("diloco_digest")[self.placement.tensor().flatten().long()].view(self.dims.diloco, -1)
                record["replicas_agree"] = bool((digests == digests[0]).all())
                record["outer_digest"] = [int(x) for x in digests[0].tolist()]  # this replica's, per rank
        if self.args.moe_experts:
            micro_batches = self.sampler.global_batch // self.sampler.micro_batch  # over all dp ranks
            record["moe"] = moe.stats_record(g, self.args.moe_layer_ids(), self.args.moe_experts, micro_batches)
        if self.verifier is not None:  # seconds the full shard checks took, once every rank's are done
            done = g.column("data_verify_s")
            record["data_verify_s"] = float(done.max()) if bool((done >= 0).all()) else None
        if local["c4_findings"] is not None:
            record["c4_findings"] = local["c4_findings"]
        if local.get("compile_s") is not None:  # train.compile: seconds before this run's first step
            record["compile_s"] = local["compile_s"]
        return record

    def _grad_norm(self, g: GatheredStats) -> float:
        """The model's gradient norm from the stages' squares (`norm_by_stage`): the rows of
        rank 0's replica, where every stage's square is held by the same number of ranks."""
        replica = g.column("grad_replica")
        mine = replica == replica[0]
        return math.sqrt(float(g.column("grad_sq")[mine].sum()) * self.dims.pp / int(mine.sum()))

    def _noise_record(self, g: GatheredStats) -> dict:
        """`noise_scale` (and its raw numbers) from the gathered squares: the mean over all
        the step's micro-batches of |g_j|^2 (pipeline stages' pieces add up, data-parallel
        ranks hold other micro-batches), and the mean over replicas of |G|^2."""
        if self.noise is None:
            return {}
        if "gns_small_sq" not in g:
            return self.noise.update(math.nan, math.nan)  # not available: null
        t = self.cfg.train
        small = float(g.column("gns_small_sq").sum()) / (t.global_batch // t.micro_batch)
        big = float(g.column("grad_sq").mean()) * (self.dims.pp if self.norm_by_stage else 1)  # each stage's pp-th
        return self.noise.update(small, big)

    def _outer_record(self, o, step: int) -> dict:
        """DiLoCo's part of a record (every rank decides the same, so this rank's says it)."""
        rejected = [{"replica": r.replica, "fragment": r.fragment, "norm": r.norm, "why": r.why} for r in o.rejected]
        for r in o.rejected:
            self.log(f"DiLoCo: step {r.step}: rejected replica {r.replica}'s pseudo-gradient (fragment {r.fragment}): "
                     f"{r.why}; the outer step goes on with the others")
        for why in o.retries:
            self.log(f"DiLoCo: step {step}: a replica left during the outer step ({why}); ran it again "
                     "on the next quorum with the same pseudo-gradients")
        healed = {} if o.healed_from is None else {"healed_from": o.healed_from, "healed_step": o.healed_step}
        return {"outer_step": o.outer_step, "replicas": o.replicas, "synced_fragments": o.synced,
                "applied_fragments": o.applied, "rejected": rejected, "retries": o.retries, **healed}

    def _check_quorum_timeout(self, outer, step_time: float) -> None:
        """An elastic replica waits for its peers at every outer step for up to
        elastic.quorum_timeout_s; peers can arrive up to a round apart, so it must exceed
        H x the step time."""
        if outer is None or not self.cfg.elastic.lighthouse:
            return
        self._step_times = (getattr(self, "_step_times", []) + [step_time])[-20:]
        if not outer.synced or len(self._step_times) < 5:
            return
        need = self.cfg.diloco.inner_steps * sorted(self._step_times)[len(self._step_times) // 2]
        if self.cfg.elastic.quorum_timeout_s <= need:
            raise ConfigError(f"elastic.quorum_timeout_s = {self.cfg.elastic.quorum_timeout_s:g} must exceed H x the "
                              f"step time = {self.cfg.diloco.inner_steps} x {need / self.cfg.diloco.inner_steps:.2f} s "
                              f"= {need:.1f} s (peers reach the outer step up to a round apart); set it to at least "
                              f"{2 * need:.0f}")

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over this rank's share of the held-out split (NaN on ranks without the
        last pipeline stage); under DiLoCo on the global parameters (`eval.params`). Its
        collectives are not a step's (paused), and the MoE layers forget what it routed."""
        swap = self.outer is not None and self.cfg.eval.params == "global"
        if swap:
            self.outer.swap()
        try:
            with self.recorder.paused():
                losses = [self._eval_batch(b) for b in range(self.cfg.eval.batches)]
        finally:
            if swap:
                self.outer.swap()
        _reshard(self.par.parts)
        moe.reset_stats(self.par.parts)
        if self.par.ep_topology is not None:
            self.par.ep_topology.stats.take()
        return float(torch.stack(losses).mean())

    def _eval_batch(self, b: int) -> torch.Tensor:
        """Held-out global batch b, this rank's share, in training's micro-batches."""
        gb, mb = self.cfg.train.global_batch, self.cfg.train.micro_batch
        per = gb // self.batch_mesh.size()
        first = self.n_train + b * gb + self.batch_mesh.get_local_rank() * per
        micro = [self.dataset.batch(list(range(i, i + mb))) for i in range(first, first + per, mb)]
        if self.par.schedule is not None:
            return self._pipeline_step(micro, train=False)
        with self.autocast:
            return torch.stack([self._forward(x, y).float() for x, y in micro]).mean()

    def _forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The unpipelined model's loss on one micro-batch (with document ids if masked)."""
        docs = self._docs(inputs)
        kwargs = {} if docs is None else {"docs": docs}
        return self.model(inputs.to(self.device), targets.to(self.device), **kwargs)

    def _idle_s(self, step_time: float) -> float:
        """Seconds of this step spent blocked in pipeline receives (the bubble), from the
        collective records; 0 without a pipeline."""
        if self.par.schedule is None:
            return 0.0
        since = time.monotonic_ns() - int(step_time * 1e9)
        waits = [r.t_exit - max(r.t_wait, r.t_enter) for r in self.recorder.records()
                 if r.op == "recv" and r.t_enter >= since and r.t_exit]
        return sum(waits) / 1e9

    def metrics_log(self, start: int) -> MetricsLog:
        cfg, writer, progress = self.cfg, None, None
        if self.rank == 0:
            write_resolved_config(cfg, start)
            writer = MetricsWriter(self.run_dir, resume_step=start, tensorboard=cfg.metrics.tensorboard,
                                   wandb=_wandb_options(cfg) if cfg.metrics.wandb else None)
            progress = _progress(cfg, start)
            nodes = self.env.world_size // self.env.local_world_size
            self.log(f"dist-train: {self.dims.describe()}, {self.env.world_size} rank(s) on {nodes} node(s) "
                     f"({self.device.type}), "
                     f"{count_params(self.args)['total'] / 1e6:.2f}M parameters, steps {start}..{cfg.train.steps}, "
                     f"{self._precision()}")
        return MetricsLog(self.build_record, writer, progress, cfg.metrics.log_every, cfg.train.steps)

    def _precision(self) -> str:
        """The start line's dtypes: the compute's (autocast where it casts), FSDP's gathers and reductions."""
        compute, param, reduce = resolve_dtypes(self.cfg.train, self.device.type)
        cast = "" if isinstance(self.autocast, nullcontext) else " (autocast)"
        fsdp = f", FSDP gathers {param}, reduces {reduce}" if self.dims.fsdp_enabled else ""
        return f"compute in {compute}{cast}{fsdp}"

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> Path:
        compile_s = self._compile() if self.cfg.train.compile else None
        start = self.resume()
        self.healed, self.joined = None, (start, 0.0)
        if self.cfg.elastic.lighthouse:
            t0 = time.perf_counter()
            start = self._join(start)
            self.joined = (start, time.perf_counter() - t0)
        self.recorder.reset_step_counts()  # start-up collectives are no step's
        c4 = start_monitor(self.cfg, self.env, self.recorder, self.device, self.log)
        with contextlib.closing(c4), self.metrics_log(start) as metrics:
            step = start
            while step < self.cfg.train.steps:
                step += 1
                t0 = time.perf_counter()
                c4.step_begin(step)
                loss, grad_norm = self.train_step()
                t_outer = time.perf_counter()
                outer = self.outer.after_step(step) if self.outer else None  # DiLoCo: every H steps
                t_outer = time.perf_counter() - t_outer
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_time = time.perf_counter() - t0
                eval_loss = self.evaluate() if self.eval_due(step) else float("nan")
                metrics.submit(step, self.step_stats(loss, step_time, eval_loss, float(grad_norm)),
                               self.recorder.background,
                               lr=self.scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                               c4_findings=c4.findings_count, outer=outer, outer_s=t_outer, time=time.time(),
                               healed=self.healed if step == start + 1 else None,
                               source_counts=self.sampler.source_counts() if self.source_names else None,
                               compile_s=compile_s if step == start + 1 else None)
                self.finish_save(c4, metrics.last)
                self._check_quorum_timeout(outer, step_time)
                c4.step_end(step, time.perf_counter() - t0)
                step = self._catch_up(outer, step)
                if self.checkpoint_due(step):
                    metrics.flush()  # metrics.jsonl holds every step a checkpoint holds
                    self.save(step, c4)
            self.finish_save(c4)  # the last save, before the run counts as done
        return self.run_dir

    def close(self) -> None:
        if getattr(self, "_membership", None) is not None:
            self._membership.close()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _reshard(parts) -> None:
    """Free FSDP's gathered parameters after a forward without backward (an evaluation):
    the root stays gathered after forward on purpose, for the backward that follows."""
    from torch.distributed.fsdp import FSDPModule

    for part in parts:
        for m in part.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def _wandb_options(cfg: Config) -> dict:
    """wandb.init's arguments from [metrics] (empty fields left to W&B's defaults)."""
    m = cfg.metrics
    return {"project": m.wandb_project, "entity": m.wandb_entity or None, "name": m.wandb_name or cfg.run.name,
            "group": m.wandb_group or None, "tags": list(m.wandb_tags) or None, "mode": m.wandb_mode,
            "config": cfg.to_dict()}


def _progress(cfg: Config, start: int):
    if not cfg.metrics.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc=cfg.run.name, unit="step", dynamic_ncols=True)


def train(cfgs: list[Config]) -> list[Path]:
    """Run each config in turn in this job (one launch, one process group); the first
    run sets up the process group and the last tears it down. A collective failing
    because a peer is gone raises `PeerLost` (one line; the traceback is logged)."""
    trainers: list[Trainer] = []
    run_dirs = []
    try:
        for cfg in cfgs:
            try:
                trainer = Trainer(cfg)
                trainers.append(trainer)
                run_dir = trainer.fit()
            except ShapeRefused as e:
                raise PeerLost(str(e), quiet=dist.is_initialized() and dist.get_rank() != 0) from None
            except MembershipLost as e:  # one line per replica: its rank 0 says it
                raise PeerLost(f"replica {cfg.elastic.replica_id}: {e}; this replica stops, its latest checkpoint "
                               "intact; restart the lighthouse and the replicas to resume",
                               quiet=dist.is_initialized() and dist.get_rank() != 0) from None
            except Exception as e:
                rank = dist.get_rank() if dist.is_initialized() else 0
                lost = peer_lost(e, get_recorder(), cfg.run_dir, rank)
                if lost is None:
                    raise
                raise lost from None
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
