"""`dist-train plan`: enumerate the valid layouts of a config on N devices and rank them by
an analytic model of memory per rank and step time. Nothing here runs a model; every number
is a formula below over the config's shape, the layout and the device / link figures.

Notation: L blocks, h = model.dim, f = ffn_dim, V = vocab, kv = n_kv_heads x head_dim / h,
s = seq_len, b = micro_batch, t = tp, p = pp, m = micro-batches per step on one data-parallel
rank (global_batch / (dp x b)), d = dp_shard (FSDP shards over it when dp_replicate x
dp_shard > 1, as parallel/data_parallel.py does), e = bytes of the compute dtype (fp32 on
CPU: 4, bf16 on GPU: 2), sbh = b x s x h elements.

Memory per rank (the rank that peaks: every pipeline rank is evaluated, the maximum kept)
  P_r   = parameters this rank holds before FSDP sharding: its L/p blocks split over tp
          (comm_model.unit_params), the embedding (V h / t) on pp rank 0, the head
          (V h / t, unless tied) and final norm on pp rank p - 1
  weights   4 P_r / d      fp32 master weights (the trainer keeps fp32 parameters; on GPU
                           FSDP casts a gathered copy to bf16 for compute)
  grads     4 P_r / d      fp32 sharded gradients (reduce_dtype fp32)
  optimizer 8 P_r / d      AdamW m and v in fp32 (SGD with momentum: 4, without: 0)
  FSDP transients (d > 1 or dp_replicate > 1)
            gathered parameters in the compute dtype: the root unit (embedding, norm, head;
            kept gathered through backward) + 2 blocks (the running one and the prefetched
            one); pipeline_schedule "layered" keeps the whole stage gathered: e P_r
            unsharded gradient accumulation: with m > 1 FSDP2 keeps every unit's unsharded
            gradient across the micro-batches that skip the reduce-scatter: 4 P_r; with
            m = 1, one block's
  activations, per block and micro-batch (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", sec. 4: count every tensor autograd keeps for
  the backward; with sequence parallelism the tensors outside the tensor-parallel regions are
  split by t). Counted for this Llama block (RMSNorm, GQA attention, SwiGLU, no dropout)
  from what its ops save, not the paper's GPT block (LayerNorm, GeLU, dropout masks, 34 sbh
  bytes + 5 a s^2 b at 16 bits):
    kernels "torch" (the CPU path: plain-torch references, SDPA with k, v repeated for GQA)
      none       e sbh (9/t + 2) + 4 e sbf / t
                 (each RMSNorm saves its input and x*rstd: 4/t; q, k and v as repeated for
                 SDPA, its output and the reshaped copy wo reads: 5/t; the two norm outputs
                 gathered over tp that the column-parallel matmuls keep: 2 - torch's DTensor
                 TP keeps the gathered input, where Megatron re-gathers it in backward;
                 w1 and w3 outputs, silu(w1 x), their product: 4f)
      selective  e sbh (3/t + 2 kv/t + 2) + 2 e sbf / t   (the block input and the outputs of
                 every matmul and of attention, model.py's _SAVED_OPS; wo's and w2's partial
                 outputs before the reduce-scatter are full-sequence: 2)
    kernels "triton" (GPU: fused RMSNorm saves its input, SwiGLU its two inputs, flash
    attention q, k, v unrepeated and its output)
      none       e sbh (5/t + 2 + 2 kv/t) + 3 e sbf / t
      selective  e sbh (2/t + 2 kv/t + 2) + 2 e sbf / t   (attention is a custom kernel, not
                 an aten op the policy can keep: it is recomputed)
    full (both)  e sbh / t: only the block input (sequence-sharded) is kept
    With full or selective, the backward recomputes one block at a time: one block's "none"
    activations of one micro-batch are added once.
  head, per micro-batch on the last stage: the final norm (torch: 2 e sbh / t, triton: 1),
  and the fused linear + cross-entropy, which computes its gradients in the forward and keeps
  them: e sbh (grad of the gathered hidden states) + 4 V h / t (fp32 grad of the head)
  micro-batches in flight (their activations alive at once) on pp rank r:
    no pipeline: 1 (plain accumulation: each micro-batch's backward runs before the next)
    gpipe: m (all forwards first); layered (breadth first): m, on every rank
    1f1b: min(m, p - r) (torch's Schedule1F1B warms up p - r forwards)
    interleaved (v = 2 chunks of L/(p v) blocks per rank): min(m v, (v - 1) p + 2 (p - 1 - r)
      + 1) chunks (torch's _get_warmup_ops, plus the first steady-state forward)
    the head: m under gpipe / layered, else 1
  peak = baseline + weights + optimizer + max(grads + FSDP transients + activations,
         grads + 4 P_r / d (the foreach AdamW step's temporary, sqrt(v)))
  baseline: the framework's own memory (device figure) in what the peak is checked against,
  the record's peak_allocated_bytes: on CPU the heap in use (dist_train/heap_peak.py), which
  counts torch's, gloo's and the data loader's own allocations; it is measured once
  (bench/planner.py: a run of a model with next to no parameters) and given in the device
  file (baseline_gb); on GPU the CUDA allocator's peak excludes the context: 0.

Step time (one optimizer step)
  FLOPs per token: model.flops_per_token (6 x matmul parameters + 12 L h s attention;
  Kaplan et al. 2020, PaLM app. B); full recompute adds a forward (x 4/3); selective adds
  nothing countable on the torch path (it recomputes elementwise ops) and the attention
  forward (4 L h s) on the triton path
  compute  T_c = global_batch x s x FLOPs per token / (world x peak x efficiency)
  collectives: bytes from comm_model.dense_step_bytes (tp with sequence parallel, FSDP,
  HSDP; fp32) on this rank's stage (L/p blocks), scaled to e bytes where the payload is in
  the compute dtype (tp activations, FSDP's gathered parameters), 4 bytes for the gradient
  reduce-scatter and all-reduce; layered pipelines gather each stage once for the forward
  and once for the backward (2 x 4 P_r in 2 L/p + 1 calls), not per micro-batch (2 L/p + 1
  calls per micro-batch: each block unit in forward and backward, the root once). A ring
  collective over n ranks moves (n - 1)/n of the gathered/scattered size per rank, an all-reduce 2 (n - 1)/n, and
  pays (n - 1) link latencies per call, or the device's sync floor if that is more:
  T = wire bytes / bandwidth + calls x max((n - 1) x latency, sync); a p2p message pays
  max(latency, sync). sync (device.sync_ms, 0 on the GPU presets): on ranks that share cores
  a call waits for the last rank to be scheduled, which the idle-link latency does not see;
  bench/planner.py measures it as the extra time per call of 1-float all-reduces between
  rounds of matmuls on every rank, against the same rounds without them
  pipeline p2p: every micro-batch sends its activation forward and its gradient back at each
  of the rank's chunk boundaries (1; interleaved v; layered L/p): 2 m c e sbh / t bytes
  expert parallel (MoE): per MoE block and micro-batch 4 all-to-alls (dispatch and combine,
  forward and backward) of b s k h e / t bytes each, (ep - 1)/ep of it on the wire
  links: each mesh dim's groups are laid out as the trainer would lay them: topology.place
  with parallel.placement over the topology (`ordered`, row-major with tp innermost, when
  no [topology] is given, as the trainer does), and each dim is charged the slowest link
  class (intra_node, intra_cluster, inter_cluster) any of its groups crosses
  (topology.group_link); pp is charged the slowest hop between consecutive stages, ep the
  slowest of its groups (consecutive chunks of the flattened dp_replicate x dp_shard x tp).
  Without a [topology] the nodes are --nodes (default 8 GPUs a node on the presets) in one
  cluster; a class's bandwidth_gbps is Gbit/s (bytes/s = x 1e9 / 8), latency_ms per hop
  bubble: gpipe and 1f1b (p - 1)/(m + p - 1) of the pipelined time, i.e. the compute and tp
  time grow by (p - 1)/m; interleaved by (p - 1)/(v m) (Narayanan et al. 2021); layered
  (breadth first over L/p stages per rank, Lamy-Poirier 2022) by (p - 1)/(m L / p)
  ranks sharing cores (device.cores, CPU: a node's n ranks on c < n cores, so the measured
  per-rank peak is a core's rate x c / n): a rank waiting in the bubble yields its core to
  the busy ones, and the pipelined time is the larger of the node's total work over its cores
  (the busy time B) and the critical path at a core per rank, B (1 + bubble) c / n (the
  work and span bounds of a greedy scheduler, Brent 1974): B max(1, (1 + bubble) c / n);
  with a device per rank (GPUs, cores = 0) B (1 + bubble)
  T = pipelined time + exposed data-parallel time, where the
  data-parallel collectives (FSDP gathers, reduce-scatters, HSDP all-reduce) are hidden
  behind compute on devices that overlap them (GPU: separate streams), exposed = max(0,
  T_dp - T_c), and fully exposed on CPU (gloo runs on the cores that compute)
  tokens/s = global_batch x s / T;  MFU = tokens/s x FLOPs per token (no recompute) /
  (world x peak)

Not modelled: allocator fragmentation, the optimizer's and norms' memory-bound time, kernel
launch overhead, DiLoCo.

Devices and links are two files. The links are the topology `dist-train local/torchrun
--topology T.toml` takes (dist_train/topology.py, read and checked by its functions: a
[topology] table with nodes, clusters or cluster_map, and links per class with
bandwidth_gbps in Gbit/s and latency_ms); `plan --topology T.toml` (or a [topology] section
in the config) gives any class figures over the preset's defaults (GPU_PRESETS below:
intra_node = NVLink, intra_cluster = InfiniBand; inter_cluster has none and is needed with
several clusters, as is every class a launch uses under --gpu cpu; a field a class does not
give is the preset's, a latency neither gives is 0):

    [topology]
    nodes = 8
    clusters = 2
    links = { inter_cluster = { bandwidth_gbps = 100.0, latency_ms = 0.5 } }

The device is `--device-file D.toml` (one [device] table; over the --gpu preset's peak from
mfu.PEAK_TFLOPS and datasheet memory; --gpu cpu needs it; an unknown or bad field is one
line naming it):

    [device]
    name = "cpu"
    peak_tflops = 0.05    # per rank, in the compute dtype (needed on cpu)
    memory_gb = 5.0       # per rank (needed on cpu)
    baseline_gb = 0.3     # framework memory counted by the peak (CPU: the heap of a near-empty run); 0
    efficiency = 1.0      # fraction of peak the matmuls reach (cpu 1.0, GPUs 0.75; --efficiency wins)
    overlap = false       # data-parallel collectives overlap compute (cpu false, GPUs true)
    cores = 2             # cores the ranks of a node share (cpu; absent or 0: a device per rank)
    sync_ms = 2.0         # the least a synchronising call costs: the ranks' skew (cpu; 0: latency only)
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import topology as _topology
from .comm_model import dense_step_bytes, unit_params
from .config import Config, ConfigError
from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GB = 1e9
SCHEDULES = ("gpipe", "1f1b", "interleaved", "layered")
CHECKPOINTS = ("none", "full", "selective")
INTERLEAVE = 2  # parallel/pipeline.py: virtual stages per rank


@dataclass(frozen=True)
class Link:
    name: str         # the link class (dist_train/topology.py's LINK_CLASSES)
    bandwidth: float  # bytes/s per rank and direction
    latency: float    # s per hop


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float       # per rank, compute dtype
    memory_bytes: float
    efficiency: float = 0.75
    baseline_bytes: float = 0.0
    overlap: bool = True
    kernels: str = "triton"  # which ops' saved tensors the activation model counts
    dtype_bytes: int = 2
    cores: int = 0           # cores a node's ranks share (CPU); 0: every rank has its own device
    sync_s: float = 0.0      # the least one synchronising call (collective, send/recv) costs


# Datasheet memory; links in topology.py's classes and units (Gbit/s, ms): intra_node =
# NVLink per direction (H100/H200 NVLink4 900 GB/s total = 450 GB/s = 3600 Gbit/s a
# direction, A100 NVLink3 300 GB/s = 2400 Gbit/s, B200 NVLink5 900 GB/s = 7200 Gbit/s),
# intra_cluster = one InfiniBand NIC per GPU (A100: HDR 200 Gbit/s; H100/H200/B200: NDR 400
# Gbit/s). Latencies are typical NCCL per-hop figures (assumed, not measured here): 0.003 ms
# NVLink, 0.010 ms InfiniBand. No datasheet gives a link between clusters: inter_cluster has
# no default (a topology of several clusters must give its bandwidth_gbps). Efficiency 0.75:
# the fraction of the dense bf16 peak large GEMMs reach on these parts (an assumption,
# stated; --efficiency changes it).
GPU_PRESETS = {
    "h100": dict(name="H100", memory_gb=80, intra_node=3600, intra_cluster=400),
    "a100": dict(name="A100", memory_gb=80, intra_node=2400, intra_cluster=200),
    "h200": dict(name="H200", memory_gb=141, intra_node=3600, intra_cluster=400),
    "b200": dict(name="B200", memory_gb=192, intra_node=7200, intra_cluster=400),
}
PRESET_LATENCY_MS = {"intra_node": 0.003, "intra_cluster": 0.010}
GPUS_PER_NODE = 8  # the presets' nodes (without --nodes or topology.nodes)
GPU_CHOICES = (*GPU_PRESETS, "cpu")
DEVICE_FIELDS = ("name", "peak_tflops", "memory_gb", "baseline_gb", "efficiency", "overlap", "cores", "sync_ms")


def preset_links(gpu: str) -> dict:
    """A preset's link defaults as a topology.links table (Gbit/s, ms); {} for cpu."""
    if gpu not in GPU_PRESETS:
        return {}
    return {c: {"bandwidth_gbps": float(GPU_PRESETS[gpu][c]), "latency_ms": PRESET_LATENCY_MS[c]}
            for c in PRESET_LATENCY_MS}


@dataclass
class Network:
    """The devices and what joins them: dist_train/topology.py's Topology (nodes, clusters)
    on the planned launch, the figures of each link class, and the placement mode the
    trainer would use (`parallel.placement`; without a [topology] the trainer places
    `ordered`)."""
    device: Device
    topo: _topology.Topology
    links: dict                  # link class -> Link
    placement: str = "ordered"   # what place() is called with
    given: bool = False          # a [topology] was given (else place() sees none, as the trainer)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def gpus_per_node(self) -> int:
        return self.topo.per_node

    @property
    def total(self) -> int:
        return self.topo.world

    def dim_links(self, lay) -> dict:
        """Per mesh dim of the layout (and ep), the Link its groups cross under the placement
        the trainer would choose (topology.place): the slowest class over all its groups
        (group_link); for pp, the slowest between consecutive stages (the p2p hops)."""
        shape = (1, lay.pp, lay.dp_replicate, lay.dp_shard, lay.tp)
        key = (shape, lay.ep)
        if key in self._cache:
            return self._cache[key]
        p = _topology.place(self.placement, shape, self.topo if self.given else None, lay.ep)
        order = _topology.LINK_CLASSES.index
        out = {}
        for dim, size in zip(_topology.MESH_DIMS, shape):
            if size <= 1:
                continue
            groups = p.groups(dim)
            if dim == "pp":
                classes = [self.topo.link(g[i], g[i + 1]) for g in groups for i in range(len(g) - 1)]
            else:
                classes = [self.topo.group_link(g) for g in groups]
            out[dim] = self.link(max(classes, key=order))
        if lay.ep > 1:  # ep: consecutive chunks of the flattened dp_replicate x dp_shard x tp
            classes = [self.topo.group_link(p.ranks[i:i + lay.ep]) for i in range(0, len(p.ranks), lay.ep)]
            out["ep"] = self.link(max(classes, key=order))
        self._cache[key] = out
        return out

    def link(self, cls: str) -> Link:
        return self.links[cls]


def _preset_device(gpu: str, efficiency: float | None) -> Device:
    import torch

    from .mfu import peak_flops

    p = GPU_PRESETS[gpu]
    return Device(p["name"], peak_flops(p["name"], torch.bfloat16), p["memory_gb"] * GB,
                  0.75 if efficiency is None else efficiency)


def load_device(path: str | Path | None, gpu: str, efficiency: float | None = None) -> Device:
    """The device: the --gpu preset, with a device file's [device] fields over it (module
    docstring); --gpu cpu needs the file. Every mistake is one line naming the field."""
    if path is None:
        if gpu == "cpu":
            raise UserError("--gpu cpu needs --device-file D.toml with a [device] table (peak_tflops, memory_gb, "
                            "baseline_gb); bench/planner.py measures one for this machine")
        return _preset_device(gpu, efficiency)
    path = Path(path)
    where = f"--device-file {path}"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not valid TOML ({e})") from None
    dev_raw = raw.get("device")
    if not isinstance(dev_raw, dict) or set(raw) != {"device"}:
        raise UserError(f"{where}: must hold one [device] table (peak_tflops, memory_gb, baseline_gb, efficiency, "
                        "overlap, name); the links are the topology's (--topology)")
    for key in dev_raw:
        if key not in DEVICE_FIELDS:
            raise UserError(f"{where}: device.{key} is not a device field; use {', '.join(DEVICE_FIELDS)}")

    def number(key: str, *, positive=True, default=None) -> float:
        v = dev_raw.get(key, default)
        if v is None:
            raise UserError(f"{where}: device.{key} is needed (no --gpu preset gives it)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and not v > 0) or v < 0:
            raise UserError(f"{where}: device.{key} = {v!r} must be a {'positive' if positive else 'non-negative'} "
                            "number")
        return float(v)

    overlap = dev_raw.get("overlap", gpu != "cpu")
    if not isinstance(overlap, bool):
        raise UserError(f"{where}: device.overlap = {overlap!r} must be true or false")
    cores = dev_raw.get("cores", 0)
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 0:
        raise UserError(f"{where}: device.cores = {cores!r} must be a whole number of cores the ranks of a node "
                        "share (0 or absent: a device per rank)")
    base = _preset_device(gpu, None) if gpu != "cpu" else None
    cpu = gpu == "cpu"
    eff = efficiency if efficiency is not None else number("efficiency", default=1.0 if cpu else 0.75)
    if not 0 < eff <= 1:
        raise UserError(f"{where}: device.efficiency = {eff:g} must be in (0, 1]")
    return Device(str(dev_raw.get("name", base.name if base else "cpu")),
                  number("peak_tflops", default=base.peak_flops / 1e12 if base else None) * 1e12,
                  number("memory_gb", default=base.memory_bytes / GB if base else None) * GB,
                  eff, number("baseline_gb", positive=False, default=0.0) * GB,
                  overlap, "torch" if cpu else "triton", 4 if cpu else 2, cores,
                  number("sync_ms", positive=False, default=0.0) / 1e3)


def network(cfg: Config, gpus: int, gpu: str = "h100", nodes: int | None = None, device_file=None,
            efficiency: float | None = None) -> Network:
    """The planned launch: `gpus` ranks on `nodes` nodes (default: topology.nodes, else the
    presets' 8 a node, 1 node on cpu), clustered and linked as the config's [topology] says
    (`--topology T.toml` fills it, as for `dist-train local`; topology.build_topology checks
    it), the link classes' figures from topology.links over the preset's defaults."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    if gpu not in GPU_CHOICES:
        raise UserError(f"--gpu {gpu!r}: use one of {', '.join(GPU_CHOICES)}")
    dev = load_device(device_file, gpu, efficiency)
    t = cfg.topology
    if nodes is None and not t.nodes and gpu != "cpu" and gpus > GPUS_PER_NODE and gpus % GPUS_PER_NODE:
        raise UserError(f"--gpus {gpus}: {gpu} nodes hold {GPUS_PER_NODE} GPUs; use fewer than {GPUS_PER_NODE} or a "
                        f"multiple of {GPUS_PER_NODE}, or give --nodes (or topology.nodes)")
    if nodes is None:
        nodes = t.nodes or (1 if gpu == "cpu" or gpus <= GPUS_PER_NODE else gpus // GPUS_PER_NODE)
    if nodes < 1 or gpus % nodes:
        src = "--nodes" if nodes != t.nodes else "topology.nodes"
        raise UserError(f"--gpus {gpus} does not fill {nodes} nodes ({src}) equally; use a multiple of {nodes} GPUs")
    try:
        topo = _topology.build_topology(t, gpus, nodes)
    except ConfigError as e:
        raise UserError(str(e)) from None
    defaults = preset_links(gpu)
    n_clusters = len(set(topo.cluster_of_node))
    needed = {"intra_node": topo.per_node > 1, "intra_cluster": nodes > n_clusters, "inter_cluster": n_clusters > 1}
    links = {}
    for cls in _topology.LINK_CLASSES:
        spec = {**defaults.get(cls, {}), **t.links.get(cls, {})}
        bps, lat = _topology.link_si(spec)
        if bps is None:
            if needed[cls]:
                why = f"no default for {gpu}" if gpu == "cpu" or cls == "inter_cluster" else "none given"
                raise UserError(f"topology.links.{cls}.bandwidth_gbps is needed to plan this launch ({why}); give it "
                                f"in the topology file (--topology T.toml), e.g. links = {{ {cls} = "
                                "{ bandwidth_gbps = 100.0, latency_ms = 0.01 } }")
            bps = float("inf")
        links[cls] = Link(cls, bps, lat or 0.0)
    return Network(dev, topo, links, cfg.parallel.placement, _topology.topology_given(t))


def default_topology(gpu: str, gpus: int, efficiency: float | None = None) -> Network:
    """A preset's launch with no [topology]: 8 GPUs a node, one cluster."""
    return network(Config(), gpus, gpu, efficiency=efficiency)


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    micro_batch: int = 1
    checkpoint: str = "none"

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def pipelined(self) -> bool:
        return self.pp > 1 or self.schedule == "layered"

    def overrides(self) -> list[str]:
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.pp_schedule={self.schedule}",
                f"parallel.dp_replicate={self.dp_replicate}", f"parallel.dp_shard={self.dp_shard}",
                f"parallel.ep={self.ep}", f"train.micro_batch={self.micro_batch}",
                f"train.activation_checkpoint={self.checkpoint}"]

    def set_line(self) -> str:
        return " ".join(f"--set {o}" for o in self.overrides())

    def short(self) -> str:
        return (f"tp{self.tp} pp{self.pp}{'/' + self.schedule if self.pipelined else ''} "
                f"dp{self.dp_replicate}x{self.dp_shard}{f' ep{self.ep}' if self.ep > 1 else ''} "
                f"mb{self.micro_batch} ac:{self.checkpoint}")


def apply_layout(cfg: Config, layout: Layout) -> Config:
    c = copy.deepcopy(cfg)
    p, t = c.parallel, c.train
    p.tp, p.pp, p.pp_schedule, p.dp_replicate, p.dp_shard, p.ep = (
        layout.tp, layout.pp, layout.schedule, layout.dp_replicate, layout.dp_shard, layout.ep)
    t.micro_batch, t.activation_checkpoint = layout.micro_batch, layout.checkpoint
    return c


def model_args(cfg: Config):
    """ModelArgs of the config; a zero vocab_size is the tokenizer's (byte: 258, else read)."""
    from .model import ModelArgs

    vocab = cfg.model.vocab_size
    if not vocab:
        if cfg.data.tokenizer == "byte":
            from dist_train.data.tokenizer import ByteTokenizer

            vocab = ByteTokenizer().vocab_size
        else:
            try:
                from dist_train.data.tokenizer import load_tokenizer

                vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
            except Exception as e:  # a missing tokenizer file: say so in one line
                raise UserError(f"model.vocab_size = 0 and data.tokenizer = {cfg.data.tokenizer!r} cannot be read "
                                f"({e}); set model.vocab_size for planning") from None
    return ModelArgs.from_config(cfg.model, cfg.data.seq_len, tokenizer_vocab=vocab)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(cfg: Config, gpus: int, topo: Network, micro_batches=None, checkpoints=CHECKPOINTS,
                      schedules=SCHEDULES) -> tuple[list[Layout], int]:
    """Every layout layout.check_layout accepts on `gpus` ranks (tp within a node, ep for MoE
    configs), and how many were refused by it."""
    from .layout import check_layout

    a = model_args(cfg)
    gb = cfg.train.global_batch
    out, refused = [], 0
    for tp in _divisors(gpus):
        if tp > topo.gpus_per_node:
            continue
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for dpr in _divisors(dp):
                dps = dp // dpr
                eps = [e for e in _divisors(dps * tp) if a.moe_experts and a.moe_experts % e == 0] or [1]
                for ep in eps:
                    per_rank = gb // dp if gb % dp == 0 else 0
                    mbs = [b for b in (micro_batches or _divisors(per_rank)) if per_rank and per_rank % b == 0]
                    for sched in (schedules if pp > 1 else [s for s in ("1f1b", "layered") if s in schedules]):
                        for mb in mbs:
                            for ac in checkpoints:
                                lay = Layout(tp, pp, sched, dpr, dps, ep, mb, ac)
                                try:
                                    check_layout(apply_layout(cfg, lay), gpus, topo.gpus_per_node,
                                                 a.vocab_size if not cfg.model.vocab_size else None)
                                except (ConfigError, ValueError):
                                    refused += 1
                                    continue
                                out.append(lay)
    return out, refused


# ----------------------------------------------------------------------------- memory


def _block_params(a, tp: int, ep: int, moe_block: bool) -> int:
    """One block's parameters on one rank (before FSDP)."""
    if not moe_block:
        return unit_params(a, tp)[0]
    attn = 2 * a.dim + (2 * a.n_heads * a.head_dim * a.dim + 2 * a.n_kv_heads * a.head_dim * a.dim) // tp
    experts = a.moe_experts // ep * 3 * a.dim * a.ffn_dim
    shared = 3 * a.dim * a.ffn_dim // tp if a.moe_shared_expert else 0
    return attn + a.dim * a.moe_experts + experts + shared


def rank_params(a, lay: Layout, pp_rank: int) -> dict:
    """Parameters pp rank `pp_rank` holds, per tp rank, before FSDP sharding."""
    moe_ids = set(a.moe_layer_ids())
    n = a.n_layers // lay.pp
    layers = [pp_rank + lay.pp * i for i in range(n)] if lay.schedule == "layered" and lay.pipelined else None
    if layers is None:
        if lay.schedule == "interleaved" and lay.pp > 1:
            c = a.n_layers // (lay.pp * INTERLEAVE)
            layers = [l for v in range(INTERLEAVE) for l in range((v * lay.pp + pp_rank) * c, (v * lay.pp + pp_rank + 1) * c)]
        else:
            layers = list(range(pp_rank * n, (pp_rank + 1) * n))
    blocks = [_block_params(a, lay.tp, lay.ep, l in moe_ids) for l in layers]
    emb = a.vocab_size * a.dim // lay.tp if pp_rank == 0 else 0
    last = pp_rank == lay.pp - 1
    head = (a.vocab_size * a.dim // lay.tp if not a.tie_embeddings else 0) + a.dim if last else 0
    return {"blocks": blocks, "embedding": emb, "head": head, "total": sum(blocks) + emb + head,
            "moe_blocks": sum(l in moe_ids for l in layers), "n_blocks": len(layers)}


def block_activation_bytes(a, micro_batch: int, seq: int, tp: int, mode: str, kernels: str, e: int) -> float:
    """Bytes one block keeps for its backward, per micro-batch (module docstring)."""
    sbh = micro_batch * seq * a.dim
    sbf = micro_batch * seq * a.ffn_dim
    kv = a.n_kv_heads * a.head_dim / a.dim
    t = tp
    if mode == "full":
        return e * sbh / t
    if kernels == "torch":
        if mode == "none":
            return e * sbh * (9 / t + 2) + 4 * e * sbf / t
        return e * sbh * (3 / t + 2 * kv / t + 2) + 2 * e * sbf / t
    if mode == "none":
        return e * sbh * (5 / t + 2 + 2 * kv / t) + 3 * e * sbf / t
    return e * sbh * (2 / t + 2 * kv / t + 2) + 2 * e * sbf / t


def moe_block_extra_bytes(a, micro_batch: int, seq: int, tp: int, mode: str, e: int) -> float:
    """An MoE block's MLP instead of the dense one: routed copies of the tokens (k per token)
    through the experts' SwiGLU, the permuted input and output, and the router's fp32 logits;
    replaces the dense 4f (torch) / 3f term. Approximate (the dispatcher's buffers vary)."""
    if mode == "full":
        return 0.0
    tokens = micro_batch * seq / tp
    k = a.moe_top_k
    dense = 4 * e * tokens * a.ffn_dim
    routed = k * tokens * (4 * a.ffn_dim + 2 * a.dim) * e + 4 * tokens * a.moe_experts
    return routed - dense


def head_activation_bytes(a, micro_batch: int, seq: int, tp: int, kernels: str, e: int) -> float:
    sbh = micro_batch * seq * a.dim
    norm = (2 if kernels == "torch" else 1) * e * sbh / tp
    return norm + e * sbh + 4 * a.vocab_size * a.dim / tp


def in_flight(lay: Layout, n_micro: int, pp_rank: int) -> tuple[float, int]:
    """(blocks x micro-batches of activations alive at the peak on this pp rank as a fraction
    of its blocks x one micro-batch, head micro-batches)."""
    if not lay.pipelined:
        return 1.0, 1
    if lay.schedule in ("gpipe", "layered"):
        return float(n_micro), n_micro
    if lay.schedule == "1f1b":
        return float(min(n_micro, lay.pp - pp_rank)), 1
    v = INTERLEAVE
    chunks = min(n_micro * v, (v - 1) * lay.pp + 2 * (lay.pp - 1 - pp_rank) + 1)
    return chunks / v, 1


@dataclass
class Memory:
    pp_rank: int
    parts: dict
    peak: float


def memory_per_rank(cfg: Config, lay: Layout, dev: Device, a=None) -> Memory:
    """The peak memory of the worst rank of the layout (module docstring)."""
    a = a or model_args(cfg)
    s, gb = cfg.data.seq_len, cfg.train.global_batch
    n_micro = gb // (lay.dp * lay.micro_batch)
    e = dev.dtype_bytes
    fsdp = lay.dp > 1
    shard = lay.dp_shard if fsdp else 1
    opt_bytes = 8 if cfg.train.optimizer == "adamw" else (4 if cfg.train.momentum else 0)
    best = None
    for r in range(lay.pp):
        P = rank_params(a, lay, r)
        Pr = P["total"]
        weights, grads, opt = 4 * Pr / shard, 4 * Pr / shard, opt_bytes * Pr / shard
        gathered = acc = 0.0
        if fsdp:
            if lay.schedule == "layered" and lay.pipelined:
                gathered = e * Pr
            else:
                gathered = e * (P["embedding"] + P["head"] + sum(sorted(P["blocks"])[-2:]))
            acc = 4 * Pr if n_micro > 1 else 4 * max(P["blocks"] or [0])
        blk = block_activation_bytes(a, lay.micro_batch, s, lay.tp, lay.checkpoint, dev.kernels, e)
        moe_extra = moe_block_extra_bytes(a, lay.micro_batch, s, lay.tp, lay.checkpoint, e)
        per_mb = P["n_blocks"] * blk + P["moe_blocks"] * moe_extra
        mbs, head_mbs = in_flight(lay, n_micro, r)
        act = mbs * per_mb
        if lay.checkpoint != "none":  # one block recomputed at a time in backward
            act += block_activation_bytes(a, lay.micro_batch, s, lay.tp, "none", dev.kernels, e)
        head = head_mbs * head_activation_bytes(a, lay.micro_batch, s, lay.tp, dev.kernels, e) if P["head"] else 0.0
        backward = grads + gathered + acc + act + head
        step = grads + 4 * Pr / shard
        peak = dev.baseline_bytes + weights + opt + max(backward, step)
        parts = {"baseline": dev.baseline_bytes, "weights": weights, "grads": grads, "optimizer": opt,
                 "fsdp_gathered": gathered, "grad_accumulation": acc, "activations": act, "head": head,
                 "optimizer_step_temp": 4 * Pr / shard}
        if best is None or peak > best.peak:
            best = Memory(r, parts, peak)
    return best


# ----------------------------------------------------------------------------- time


def _ring(nbytes: float, kind: str, n: int, calls: int, link: Link, sync: float = 0.0) -> float:
    """Wire time plus, per call, its ring latency or the device's synchronisation floor."""
    if n <= 1:
        return 0.0
    factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return nbytes * factor / link.bandwidth + calls * max((n - 1) * link.latency, sync)


@dataclass
class Estimate:
    layout: Layout
    memory: Memory
    step_time: float
    times: dict
    tokens_per_s: float
    mfu: float
    fits: bool
    reason: str = ""


def step_time(cfg: Config, lay: Layout, topo: Network, a=None) -> tuple[float, dict]:
    from .model import flops_per_token

    a = a or model_args(cfg)
    dev = topo.device
    links = topo.dim_links(lay)
    s, gb = cfg.data.seq_len, cfg.train.global_batch
    world = lay.dp * lay.tp * lay.pp
    n_micro = gb // (lay.dp * lay.micro_batch)
    e = dev.dtype_bytes
    sync = dev.sync_s
    fpt = flops_per_token(a, s)
    attn_fwd = 4.0 * a.n_layers * a.dim * s
    extra = fpt / 3 if lay.checkpoint == "full" else (attn_fwd if lay.checkpoint == "selective"
                                                       and dev.kernels == "triton" else 0.0)
    t_c = gb * s * (fpt + extra) / (world * dev.peak_flops * dev.efficiency)
    # collectives of this rank's stage, from comm_model (fp32 bytes), per mesh dim
    stage = dataclasses.replace(a, n_layers=max(1, a.n_layers // lay.pp))
    L = stage.n_layers
    tp_b = dense_step_bytes(stage, lay.tp, 1, 1, s, n_micro * lay.micro_batch, lay.micro_batch) if lay.tp > 1 else {}
    t_tp = 0.0
    if lay.tp > 1:
        link = links["tp"]
        t_tp += _ring(tp_b["all_gather"] * e / 4, "all_gather", lay.tp, n_micro * (4 * L + 2), link, sync)
        t_tp += _ring(tp_b["reduce_scatter"] * e / 4, "reduce_scatter", lay.tp, n_micro * (4 * L + 2), link, sync)
        t_tp += _ring(tp_b["all_reduce"], "all_reduce", lay.tp, n_micro * 2, link, sync)
    t_dp = 0.0
    if lay.dp > 1:
        full = dense_step_bytes(stage, lay.tp, lay.dp_shard, lay.dp_replicate, s, gb, lay.micro_batch)
        units = unit_params(stage, lay.tp)
        if lay.schedule == "layered" and lay.pipelined:  # one gather per pass, not per micro-batch
            ag, ag_calls = 2 * sum(units) * 4, 2 * L + 1
        else:
            ag, ag_calls = full["all_gather"] - tp_b.get("all_gather", 0), n_micro * (2 * L + 1)
        rs = sum(units) * 4 if lay.dp_shard > 1 else 0
        shard_link = links.get("dp_shard")
        if lay.dp_shard > 1:
            t_dp += _ring(ag * e / 4, "all_gather", lay.dp_shard, ag_calls, shard_link, sync)
            t_dp += _ring(rs, "reduce_scatter", lay.dp_shard, L + 1, shard_link, sync)
        if lay.dp_replicate > 1:
            t_dp += _ring(sum(units) // lay.dp_shard * 4, "all_reduce", lay.dp_replicate, L + 1,
                          links["dp_replicate"], sync)
    t_p2p = 0.0
    v = INTERLEAVE if lay.schedule == "interleaved" else (a.n_layers // lay.pp if lay.schedule == "layered" else 1)
    if lay.pp > 1:
        link = links["pp"]
        msg = e * lay.micro_batch * s * a.dim / lay.tp
        t_p2p = 2 * n_micro * v * (msg / link.bandwidth + max(link.latency, sync))
    t_ep = 0.0
    if lay.ep > 1 and a.moe_experts:
        moe_blocks = len(a.moe_layer_ids()) // lay.pp
        msg = lay.micro_batch * s * a.moe_top_k * a.dim * e / lay.tp
        t_ep = _ring(4 * n_micro * moe_blocks * msg, "all_to_all", lay.ep, 4 * n_micro * moe_blocks, links["ep"],
                     sync)
    if lay.pp > 1:
        bubble = (lay.pp - 1) / (v * n_micro)
    else:
        bubble = 0.0
    exposed_dp = max(0.0, t_dp - t_c) if dev.overlap else t_dp
    busy = t_c + t_tp + t_ep + t_p2p
    # ranks sharing cores: a rank waiting in the bubble yields its core to the busy ones
    sharing = topo.gpus_per_node / dev.cores if dev.cores and topo.gpus_per_node > dev.cores else 1.0
    pipelined = busy * max(1.0, (1 + bubble) / sharing)
    total = pipelined + exposed_dp
    return total, {"compute": t_c, "tp": t_tp, "dp": t_dp, "dp_exposed": exposed_dp, "pp_p2p": t_p2p, "ep": t_ep,
                   "bubble": pipelined - busy, "bubble_fraction": (pipelined - busy) / pipelined if busy else 0.0}


def estimate(cfg: Config, lay: Layout, topo: Network, a=None) -> Estimate:
    from .model import flops_per_token

    a = a or model_args(cfg)
    mem = memory_per_rank(cfg, lay, topo.device, a)
    total, times = step_time(cfg, lay, topo, a)
    tokens = cfg.train.global_batch * cfg.data.seq_len / total
    world = lay.dp * lay.tp * lay.pp
    mfu = tokens * flops_per_token(a, cfg.data.seq_len) / (world * topo.device.peak_flops)
    fits = mem.peak <= topo.device.memory_bytes
    reason = "" if fits else (f"needs {mem.peak / GB:.1f} GB on pp rank {mem.pp_rank} > {topo.device.memory_bytes / GB:.0f} "
                              f"GB ({_largest(mem.parts)})")
    return Estimate(lay, mem, total, times, tokens, mfu, fits, reason)


def _largest(parts: dict) -> str:
    name, v = max(((k, v) for k, v in parts.items() if k != "optimizer_step_temp"), key=lambda kv: kv[1])
    return f"largest: {name.replace('_', ' ')} {v / GB:.1f} GB"


@dataclass
class Plan:
    fitting: list[Estimate]
    too_big: list[Estimate]
    refused: int
    topo: Network
    gpus: int


def plan(cfg: Config, gpus: int, topo: Network, **kw) -> Plan:
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    if gpus != topo.total:
        raise UserError(f"--gpus {gpus} but the network was built for {topo.total} ranks")
    a = model_args(cfg)
    layouts, refused = candidate_layouts(cfg, gpus, topo, **kw)
    if not layouts:
        raise UserError(f"no valid layout of this config on {gpus} GPUs ({refused} refused by the pre-flight "
                        "checks); check train.global_batch (it must split over dp x micro_batch) and the model's "
                        "divisibility by tp and pp")
    ests = [estimate(cfg, lay, topo, a) for lay in layouts]
    ests.sort(key=lambda x: -x.tokens_per_s)
    return Plan([x for x in ests if x.fits], [x for x in ests if not x.fits], refused, topo, gpus)


def _network_text(n: Network) -> str:
    t = n.topo
    clusters = len(set(t.cluster_of_node))
    links = ", ".join(f"{c} {l.bandwidth * 8 / 1e9:g} Gbit/s {l.latency * 1e3:g} ms" for c, l in n.links.items()
                      if l.bandwidth != float("inf"))
    place = n.placement if n.given else "ordered (no [topology])"
    return (f"{t.nodes} node(s)" + (f" in {clusters} clusters" if clusters > 1 else "")
            + f", placement {place}" + (f"; {links}" if links else ""))


def format_plan(p: Plan, cfg: Config, top: int = 10, too_big: int = 5) -> str:
    a = model_args(cfg)
    from .model import count_params

    d = p.topo.device
    lines = [f"plan: {count_params(a)['total'] / 1e9:.3g}B parameters, seq {cfg.data.seq_len}, global batch "
             f"{cfg.train.global_batch} on {p.gpus} x {d.name} ({d.memory_bytes / GB:.0f} GB, peak "
             f"{d.peak_flops / 1e12:.4g} TFLOP/s x efficiency {d.efficiency:g}; {p.topo.gpus_per_node} per node, "
             f"{_network_text(p.topo)})",
             f"{len(p.fitting) + len(p.too_big)} valid layouts ({p.refused} refused by the pre-flight checks), "
             f"{len(p.fitting)} fit in memory; the model: dist_train/planner.py", ""]
    head = (f"{'#':>3} {'tp':>3} {'pp':>3} {'schedule':>11} {'dp_rep':>6} {'dp_shard':>8} {'ep':>3} {'mb':>3} "
            f"{'ckpt':>9} {'mem/rank GB':>11} {'step s':>9} {'tokens/s':>11} {'MFU':>6} {'bubble':>6}")
    lines.append(head)
    for i, x in enumerate(p.fitting[:top], 1):
        lay = x.layout
        lines.append(f"{i:>3} {lay.tp:>3} {lay.pp:>3} {lay.schedule if lay.pipelined else '-':>11} "
                     f"{lay.dp_replicate:>6} {lay.dp_shard:>8} {lay.ep:>3} {lay.micro_batch:>3} {lay.checkpoint:>9} "
                     f"{x.memory.peak / GB:>11.2f} {x.step_time:>9.4g} {x.tokens_per_s:>11.4g} "
                     f"{100 * x.mfu:>5.1f}% {100 * x.times['bubble_fraction']:>5.1f}%")
        lines.append(f"      {lay.set_line()}")
    if not p.fitting:
        lines.append("    (none fits)")
    if p.too_big:
        lines += ["", f"do not fit ({len(p.too_big)}; the {min(too_big, len(p.too_big))} fastest):"]
        for x in p.too_big[:too_big]:
            lines.append(f"    {x.layout.short()}: {x.reason}")
    return "\n".join(lines)


def plan_command(args) -> None:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # --topology T.toml is topology.file (cli.run)
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        raise UserError(f"--efficiency {args.efficiency}: must be in (0, 1]")
    topo = network(cfg, args.gpus, args.gpu, args.nodes, args.device_file, args.efficiency)
    kw = {}
    if args.micro_batch:
        kw["micro_batches"] = args.micro_batch
    print(format_plan(plan(cfg, args.gpus, topo, **kw), cfg, top=args.top))
