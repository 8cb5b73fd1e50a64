"""Pre-flight checks: everything about a run that can be refused before a rank starts.

One place for them, called by the CLI and the drill launcher before they launch (so a
mistake costs no start-up and ends in one line) and by every rank before it builds the
mesh (a bare `torchrun ... dist_train train` has no launcher to check for it). Each
check names the field and the fix. Nothing later re-checks: `parallelize` trusts the
dims it is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dist_train.data.sources import source_vocab_size
from dist_train.parallel.dims import MeshError, ParallelDims
from dist_train.parallel.pipeline import plan_stages

from .config import Config, ConfigError, resolve_dtypes
from .topology import build_topology, topology_given


class TensorParallelError(MeshError):
    """The model's shape does not split over the tp degree (names the field)."""


@dataclass
class RunPlan:
    """One run of a launch, checked: its config, its layout, its prepared data."""
    cfg: Config
    dims: ParallelDims
    shard_dir: Path | None = None


@dataclass
class LaunchPlan:
    """What a launcher needs to know about the runs it starts."""
    runs: list[RunPlan]
    c4: bool = False                                # some run has C4 on: the launcher hosts the detector
    sigstops: list = field(default_factory=list)    # (run dir, Injection): SIGSTOPs the launcher sends


def is_pipelined(cfg: Config, dims: ParallelDims) -> bool:
    """Pipeline stages are used for pp > 1, and for layered accumulation at any pp."""
    return dims.pp > 1 or cfg.parallel.pp_schedule == "layered"


def preflight(cfgs: list[Config], nproc: int, nodes: int | None = 1, *,
              shard_dirs: list[Path | str] | None = None, device: str | None = None) -> LaunchPlan:
    """Check every run of a launch on `nproc` ranks over `nodes` nodes (None: not known
    yet, as under Ray before it places the ranks; every rank checks again). Without
    `shard_dirs` each run's data source is prepared here (once; later calls find it
    ready), so its vocabulary can be checked against the layout too. `device`: a rank's
    own device type ("cpu", "cuda"), for the dtype check that needs the device itself
    (`check_device_dtypes`); launchers pass none (they do not touch the GPU: a CUDA
    context in the launcher would hold memory for the whole run)."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    if nodes is not None and (nodes < 1 or nproc % nodes):
        raise ConfigError(f"--nodes {nodes}: must divide --nproc {nproc} (each node gets the same number of ranks)")
    runs = []
    for i, cfg in enumerate(cfgs):
        if nodes is not None and topology_given(cfg.topology):
            build_topology(cfg.topology, nproc, nodes)  # the topology must match the launch
        shard_dir = Path(shard_dirs[i]) if shard_dirs else _prepare(cfg)
        vocab = source_vocab_size(shard_dir, cfg.data.tokenizer) if shard_dir else None
        runs.append(RunPlan(cfg, check_layout(cfg, nproc, nproc // nodes if nodes else None, vocab), shard_dir))
        if device is not None:
            check_device_dtypes(cfg, device)
        check_run_dir(cfg)
        check_extras(cfg)
    c4, sigstops = _launcher_faults(cfgs, nproc)
    return LaunchPlan(runs, c4, sigstops)


def check_extras(cfg: Config) -> None:
    """Optional packages the config asks for, checked before anything starts."""
    import importlib.util

    if cfg.metrics.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("metrics.wandb = true needs the wandb package: pip install 'dist-train[wandb]', "
                          "or set metrics.wandb = false")


def check_layout(cfg: Config, world_size: int, local_world_size: int | None = None,
                 tokenizer_vocab: int | None = None) -> ParallelDims:
    """The run's `ParallelDims` on this world, or a one-line error naming the field.
    `local_world_size` (ranks per node) lets the hierarchical all-to-all be checked;
    `tokenizer_vocab` (the data's, once known) the split of the padded vocabulary."""
    p = cfg.parallel
    _check_diloco(cfg, world_size)
    dims = ParallelDims.resolve(world_size, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard,
                                tp=p.tp, pp=p.pp, ep=p.ep, diloco=cfg.diloco.replicas)
    _check_moe(cfg, dims, local_world_size)
    if tokenizer_vocab and cfg.model.vocab_size and cfg.model.vocab_size < tokenizer_vocab:
        source = "model.init_from's config.json" if cfg.model.init_from else "model.vocab_size"
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} (from {source}) is smaller than the data's "
                          f"vocabulary of {tokenizer_vocab} ids (data.tokenizer = {cfg.data.tokenizer!r}): some token "
                          "ids would have no embedding row; use the tokenizer the model was trained with, or a "
                          "larger model.vocab_size")
    if dims.tp > 1:
        _check_tp(cfg, dims.tp, tokenizer_vocab)
    t = cfg.train
    split = dims.batch_ranks * t.micro_batch
    if t.global_batch % split:
        replicas = "diloco.replicas x " if dims.diloco > 1 else ""
        raise ConfigError(
            f"train.global_batch = {t.global_batch} must be divisible by {replicas}dp x micro_batch = "
            f"{dims.batch_ranks} x {t.micro_batch} = {split} "
            f"(dp = dp_replicate x dp_shard = {dims.dp_replicate} x {dims.dp_shard}); "
            f"set train.global_batch to a multiple of {split}")
    _check_pipeline(cfg, dims, t.global_batch // split)
    return dims


def check_device_dtypes(cfg: Config, device: str, capability: tuple[int, int] | None = None,
                        name: str | None = None) -> None:
    """Refuse a dtype the device cannot compute in, naming the field that asked for it.
    bf16 compute needs a GPU of compute capability 8.0 (Ampere) or newer; `capability` and
    `name` default to this process's current GPU (each rank checks its own at start,
    before the mesh is built). On the CPU every offered dtype runs:
    bf16 kernels, and gloo gathers and reduces bf16 (measured with torch 2.13)."""
    if device != "cuda":
        return
    compute, param, _ = resolve_dtypes(cfg.train, device)
    if compute != "bf16":
        return
    if capability is None:
        import torch

        capability, name = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    if tuple(capability) >= (8, 0):
        return
    t = cfg.train
    field = ("train.dtype = 'bf16'" if t.dtype == "bf16" else "train.param_dtype = 'bf16'" if t.param_dtype == "bf16"
             else "train.dtype = 'auto' (bf16 on a GPU)")
    fix = "set train.dtype = 'fp32'" + (" and train.param_dtype = 'fp32'" if t.param_dtype == "bf16" else "")
    raise ConfigError(f"{field}: {name or 'this GPU'} (compute capability {capability[0]}.{capability[1]}) has no "
                      f"bf16 arithmetic (it needs compute capability 8.0, Ampere, or newer); {fix}")


def check_run_dir(cfg: Config) -> None:
    """With checkpoint.resume = "none", refuse a run directory that already holds a run:
    starting over there would overwrite its metrics and checkpoints."""
    run_dir = cfg.run_dir
    if cfg.checkpoint.resume == "none" and ((run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()):
        raise ConfigError(f"run directory {run_dir} already holds a run and checkpoint.resume = 'none'; "
                          "choose a new run.name, or set checkpoint.resume = 'latest' to continue it")


# ----------------------------------------------------------------------------- the checks


def _check_diloco(cfg: Config, world_size: int) -> None:
    d = cfg.diloco
    if not d.enabled:
        if d.replicas > 1:
            raise ConfigError(f"diloco.replicas = {d.replicas} needs diloco.enabled = true (replicas that never "
                              "sync would train apart); set diloco.enabled = true, or diloco.replicas = 1")
        return
    if world_size % d.replicas:
        raise ConfigError(f"diloco.replicas = {d.replicas} does not divide the {world_size} ranks of the job; "
                          f"launch a multiple of {d.replicas} ranks or choose replicas dividing {world_size}")
    if d.inner_steps % d.fragments:
        raise ConfigError(f"diloco.fragments = {d.fragments} must divide diloco.inner_steps = {d.inner_steps} "
                          "(fragment f syncs H / F steps after fragment f - 1); choose fragments dividing it")
    if d.fragments > cfg.model.n_layers:
        raise ConfigError(f"diloco.fragments = {d.fragments} is more than model.n_layers = {cfg.model.n_layers} "
                          "(fragments are layer-contiguous); use at most that many")
    if d.overlap and d.fragments == 1:
        raise ConfigError("diloco.overlap = true is for streaming DiLoCo: set diloco.fragments > 1, or "
                          "diloco.overlap = false")
    if d.overlap and d.inner_steps // d.fragments < 2:
        raise ConfigError(f"diloco.overlap = true needs H / F >= 2 inner steps between fragment syncs (an "
                          f"exchange takes 2 steps), got {d.inner_steps} / {d.fragments}; lower diloco.fragments")


def _check_tp(cfg: Config, tp: int, tokenizer_vocab: int | None) -> None:
    """Every dimension tensor parallelism splits must divide by tp (GQA: the kv heads too)."""
    from .model import ModelArgs

    a = ModelArgs.from_config(cfg.model, cfg.data.seq_len, tokenizer_vocab=tokenizer_vocab or 1)
    vocab = a.vocab_size if cfg.model.vocab_size or tokenizer_vocab else None  # None: not known yet
    for name, value in (("model.n_kv_heads", a.n_kv_heads), ("model.n_heads", a.n_heads),
                        ("model.ffn_dim", a.ffn_dim), ("model.vocab_size", vocab)):
        if value is not None and value % tp:
            raise TensorParallelError(
                f"parallel.tp = {tp} must divide {name} = {value} (each tensor-parallel rank holds "
                f"an equal slice); choose tp dividing {value}, or change {name}")


def _check_pipeline(cfg: Config, dims: ParallelDims, n_micro: int) -> None:
    if not is_pipelined(cfg, dims):
        return
    plan_stages(cfg.model.n_layers, dims.pp, cfg.parallel.pp_schedule)  # raises with the fix
    if cfg.model.tie_embeddings:
        raise ConfigError("model.tie_embeddings = true cannot be used with pipeline stages (parallel.pp > 1 or "
                          "pp_schedule = 'layered'): the embedding and the head sit on different stages; "
                          "set model.tie_embeddings = false")
    if n_micro < dims.pp:
        raise ConfigError(f"each data-parallel rank runs {n_micro} micro-batch(es) per step, fewer than "
                          f"parallel.pp = {dims.pp} pipeline stages; raise train.global_batch or lower "
                          "train.micro_batch")


def _check_moe(cfg: Config, dims: ParallelDims, local_world_size: int | None) -> None:
    """Expert-parallel settings that cannot work, named with their fix."""
    m, p = cfg.model, cfg.parallel
    if dims.ep > 1 and not m.moe_experts:
        raise ConfigError(f"parallel.ep = {dims.ep} needs mixture-of-experts layers: set model.moe_experts "
                          "(a multiple of ep), or parallel.ep = 1")
    if m.moe_experts and m.moe_experts % dims.ep:
        raise ConfigError(f"model.moe_experts = {m.moe_experts} is not divisible by parallel.ep = {dims.ep} "
                          "(each expert-parallel rank holds the same number of experts); choose ep dividing "
                          f"{m.moe_experts}, or a multiple of ep experts")
    if p.a2a == "hierarchical" and dims.ep > 1 and local_world_size:
        if dims.world_size % local_world_size:
            raise ConfigError(f"parallel.a2a = 'hierarchical': {dims.world_size} ranks do not split into nodes of "
                              f"{local_world_size} (LOCAL_WORLD_SIZE); launch whole nodes or set parallel.a2a = 'flat'")
        # ep groups are blocks of ep consecutive ranks (parallel/expert_parallel.py): every group must
        # split into nodes the same way
        if dims.ep % local_world_size and local_world_size % dims.ep:
            raise ConfigError(f"parallel.a2a = 'hierarchical' with parallel.ep = {dims.ep} on nodes of "
                              f"{local_world_size} ranks (LOCAL_WORLD_SIZE): ep must be a multiple or a divisor "
                              "of the ranks per node; change parallel.ep or --nodes, or set parallel.a2a = 'flat'")


def _launcher_faults(cfgs: list[Config], nproc: int) -> tuple[bool, list]:
    """Fault specs checked against the world size; whether the launcher runs the detector
    (any run has C4 on), and which SIGSTOP faults it sends itself."""
    from dist_train.fault.inject import InjectError, parse_specs

    sigstops = []
    for cfg in cfgs:
        try:
            injections = parse_specs(cfg.fault.inject, nproc)
        except InjectError as e:
            raise ConfigError(f"fault.inject: {e}") from None
        sigstops += [(str(cfg.run_dir), i) for i in injections if i.kind == "sigstop"]
    return any(cfg.c4.enabled for cfg in cfgs), sigstops


def _prepare(cfg: Config) -> Path:
    from dist_train.data import prepare_sources

    return prepare_sources(cfg.data)[0][1]  # a mix's sources share the vocabulary (checked when opened)
