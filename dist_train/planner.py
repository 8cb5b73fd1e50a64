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
  baseline: the framework's own memory (device figure): on CPU peak_memory_bytes is the
  process's max RSS, which counts the Python interpreter, torch, gloo and the data loader;
  it is measured once (bench/planner.py: a run of a model with next to no parameters) and
  given in the topology file; on GPU the CUDA allocator's peak excludes the context: 0.

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
  and once for the backward (2 x 4 P_r), not per micro-batch. A ring collective over n ranks
  moves (n - 1)/n of the gathered/scattered size per rank, an all-reduce 2 (n - 1)/n, and
  pays (n - 1) link latencies per call:  T = wire bytes / bandwidth + calls x (n - 1) x latency
  pipeline p2p: every micro-batch sends its activation forward and its gradient back at each
  of the rank's chunk boundaries (1; interleaved v; layered L/p): 2 m c e sbh / t bytes
  expert parallel (MoE): per MoE block and micro-batch 4 all-to-alls (dispatch and combine,
  forward and backward) of b s k h e / t bytes each, (ep - 1)/ep of it on the wire
  links: a group's ranks are consecutive blocks of the mesh (diloco x pp x dp_replicate x
  dp_shard x tp, tp innermost); a group spanning at most one node uses the node's link
  class (NVLink), one spanning nodes the inter-node class (InfiniBand), one spanning
  clusters the inter-cluster class
  bubble: gpipe and 1f1b (p - 1)/(m + p - 1) of the pipelined time, i.e. the compute and tp
  time grow by (p - 1)/m; interleaved by (p - 1)/(v m) (Narayanan et al. 2021); layered
  (breadth first over L/p stages per rank, Lamy-Poirier 2022) by (p - 1)/(m L / p)
  T = (T_c + T_tp + T_ep + T_p2p) x (1 + bubble) + exposed data-parallel time, where the
  data-parallel collectives (FSDP gathers, reduce-scatters, HSDP all-reduce) are hidden
  behind compute on devices that overlap them (GPU: separate streams), exposed = max(0,
  T_dp - T_c), and fully exposed on CPU (gloo runs on the cores that compute)
  tokens/s = global_batch x s / T;  MFU = tokens/s x FLOPs per token (no recompute) /
  (world x peak)

Not modelled: allocator fragmentation, the optimizer's and norms' memory-bound time, kernel
launch overhead, DiLoCo. Devices: the --gpu presets below (peak from mfu.PEAK_TFLOPS, memory
from the datasheets, link defaults stated there) or a topology file (TOML):

    [device]              # optional, overrides the preset: cpu needs it
    name = "cpu"
    peak_tflops = 0.05    # per rank, in the compute dtype
    memory_gb = 5.0       # per rank
    baseline_gb = 0.3     # framework memory counted by the peak (CPU: RSS of a near-empty run)
    efficiency = 1.0      # fraction of peak the matmuls reach
    overlap = false       # data-parallel collectives overlap compute
    [links.nvlink]        # link classes: bandwidth per rank and direction, latency per hop
    bandwidth_gbps = 450  # GB/s
    latency_us = 3
    [links.ib]
    bandwidth_gbps = 50
    latency_us = 10
    [[cluster]]           # clusters of identical nodes
    name = "a"
    nodes = 8
    gpus_per_node = 8
    intra = "nvlink"      # link class inside a node
    inter = "ib"          # between the nodes of this cluster
    # inter_cluster = "wan"   (top level: between clusters; needed with several)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

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
    name: str
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


# Datasheet memory; links: NVLink per direction (H100/H200 NVLink4 900 GB/s total, A100
# NVLink3 600, B200 NVLink5 1800), one InfiniBand NIC per GPU (A100: HDR 200 Gb/s = 25 GB/s;
# H100/H200/B200: NDR 400 Gb/s = 50 GB/s). Latencies are typical NCCL per-hop figures
# (assumed, not measured here). Efficiency 0.75: the fraction of the dense bf16 peak large
# GEMMs reach on these parts (an assumption, stated; --efficiency changes it).
GPU_PRESETS = {
    "h100": dict(name="H100", memory_gb=80, nvlink=450, ib=50),
    "a100": dict(name="A100", memory_gb=80, nvlink=300, ib=25),
    "h200": dict(name="H200", memory_gb=141, nvlink=450, ib=50),
    "b200": dict(name="B200", memory_gb=192, nvlink=900, ib=50),
}
NVLINK_LATENCY_US, IB_LATENCY_US = 3.0, 10.0
GPU_CHOICES = (*GPU_PRESETS, "cpu")


@dataclass
class Topology:
    device: Device
    gpus_per_node: int
    clusters: list[tuple[str, int]]  # (name, nodes)
    intra: Link
    inter: Link
    inter_cluster: Link | None = None

    @property
    def total(self) -> int:
        return self.gpus_per_node * sum(n for _, n in self.clusters)

    def link(self, span: int) -> Link:
        """The link a group of `span` consecutive ranks crosses."""
        if span <= self.gpus_per_node:
            return self.intra
        first_cluster = self.clusters[0][1] * self.gpus_per_node
        if span > first_cluster and self.inter_cluster is not None:
            return self.inter_cluster
        return self.inter


def _preset_device(gpu: str, efficiency: float | None) -> Device:
    import torch

    from .mfu import peak_flops

    p = GPU_PRESETS[gpu]
    return Device(p["name"], peak_flops(p["name"], torch.bfloat16), p["memory_gb"] * GB,
                  0.75 if efficiency is None else efficiency)


def default_topology(gpu: str, gpus: int, efficiency: float | None = None) -> Topology:
    if gpu == "cpu":
        raise UserError("--gpu cpu needs --topology FILE with a [device] table (peak_tflops, memory_gb, "
                        "baseline_gb) and its link classes; bench/planner.py measures one for this machine")
    p = GPU_PRESETS[gpu]
    per_node = min(8, gpus)
    if gpus % per_node:
        raise UserError(f"--gpus {gpus}: {gpu} nodes hold 8 GPUs; use fewer than 8 or a multiple of 8 "
                        "(or describe the cluster with --topology)")
    return Topology(_preset_device(gpu, efficiency), per_node, [("default", gpus // per_node)],
                    Link("nvlink", p["nvlink"] * GB, NVLINK_LATENCY_US * 1e-6),
                    Link("ib", p["ib"] * GB, IB_LATENCY_US * 1e-6))


def load_topology(path: str | Path, gpu: str, gpus: int, efficiency: float | None = None) -> Topology:
    """A topology file (module docstring); every mistake is one line naming the key."""
    path = Path(path)
    where = f"--topology {path}"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not valid TOML ({e})") from None

    def number(table: dict, key: str, ctx: str, *, positive=True, default=None) -> float:
        v = table.get(key, default)
        if v is None:
            raise UserError(f"{where}: {ctx} needs {key}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and not v > 0) or v < 0:
            raise UserError(f"{where}: {ctx}.{key} = {v!r} must be a {'positive' if positive else 'non-negative'} "
                            "number")
        return float(v)

    links = {}
    for name, body in (raw.get("links") or {}).items():
        if not isinstance(body, dict):
            raise UserError(f"{where}: links.{name} must be a table with bandwidth_gbps and latency_us")
        links[name] = Link(name, number(body, "bandwidth_gbps", f"links.{name}") * GB,
                           number(body, "latency_us", f"links.{name}", positive=False) * 1e-6)

    def link(name, ctx: str) -> Link:
        if name not in links:
            known = ", ".join(links) or "none defined"
            raise UserError(f"{where}: {ctx} = {name!r} is not a link class (known: {known}); add [links.{name}]")
        return links[name]

    clusters = raw.get("cluster")
    if not isinstance(clusters, list) or not clusters:
        raise UserError(f"{where}: needs at least one [[cluster]] with nodes, gpus_per_node, intra and inter")
    per_node = {int(number(c, "gpus_per_node", f"cluster {c.get('name', i)!r}")) for i, c in enumerate(clusters)}
    if len(per_node) != 1:
        raise UserError(f"{where}: every cluster must have the same gpus_per_node (got {sorted(per_node)})")
    gpn = per_node.pop()
    names = [(str(c.get("name", i)), int(number(c, "nodes", f"cluster {c.get('name', i)!r}")))
             for i, c in enumerate(clusters)]
    intra = {c.get("intra") for c in clusters}
    inter = {c.get("inter") for c in clusters}
    if len(intra) != 1 or len(inter) != 1:
        raise UserError(f"{where}: every cluster must use the same intra and inter link classes")
    intra_link = link(intra.pop(), "cluster.intra")
    inter_name = inter.pop()
    inter_link = link(inter_name, "cluster.inter") if inter_name is not None else intra_link
    if inter_name is None and any(n > 1 for _, n in names):
        raise UserError(f"{where}: a cluster of several nodes needs inter (the link class between its nodes)")
    ic = raw.get("inter_cluster")
    if len(names) > 1 and ic is None:
        raise UserError(f"{where}: several clusters need inter_cluster (the link class between them)")
    inter_cluster = link(ic, "inter_cluster") if ic is not None else None

    dev_raw = raw.get("device")
    if dev_raw is None:
        if gpu == "cpu":
            default_topology(gpu, gpus)  # raises the one-line explanation
        dev = _preset_device(gpu, efficiency)
    else:
        base = _preset_device(gpu, None) if gpu != "cpu" else None
        name = str(dev_raw.get("name", base.name if base else "cpu"))
        cpu = gpu == "cpu"
        dev = Device(
            name,
            number(dev_raw, "peak_tflops", "device", default=base.peak_flops / 1e12 if base else None) * 1e12,
            number(dev_raw, "memory_gb", "device", default=base.memory_bytes / GB if base else None) * GB,
            efficiency if efficiency is not None else number(dev_raw, "efficiency", "device",
                                                             default=1.0 if cpu else 0.75),
            number(dev_raw, "baseline_gb", "device", positive=False, default=0.0) * GB,
            bool(dev_raw.get("overlap", not cpu)), "torch" if cpu else "triton", 4 if cpu else 2)
    topo = Topology(dev, gpn, names, intra_link, inter_link, inter_cluster)
    if gpus % gpn:
        raise UserError(f"{where}: --gpus {gpus} does not fill whole nodes of {gpn} (gpus_per_node); use a "
                        f"multiple of {gpn}")
    if gpus > topo.total:
        raise UserError(f"{where}: --gpus {gpus} is more than the topology's {topo.total} "
                        f"({sum(n for _, n in names)} nodes x {gpn})")
    return topo


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


def candidate_layouts(cfg: Config, gpus: int, topo: Topology, micro_batches=None, checkpoints=CHECKPOINTS,
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


def _ring(nbytes: float, kind: str, n: int, calls: int, link: Link) -> float:
    if n <= 1:
        return 0.0
    factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return nbytes * factor / link.bandwidth + calls * (n - 1) * link.latency


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


def step_time(cfg: Config, lay: Layout, topo: Topology, a=None) -> tuple[float, dict]:
    from .model import flops_per_token

    a = a or model_args(cfg)
    dev = topo.device
    s, gb = cfg.data.seq_len, cfg.train.global_batch
    world = lay.dp * lay.tp * lay.pp
    n_micro = gb // (lay.dp * lay.micro_batch)
    e = dev.dtype_bytes
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
        link = topo.link(lay.tp)
        t_tp += _ring(tp_b["all_gather"] * e / 4, "all_gather", lay.tp, n_micro * (4 * L + 2), link)
        t_tp += _ring(tp_b["reduce_scatter"] * e / 4, "reduce_scatter", lay.tp, n_micro * (4 * L + 2), link)
        t_tp += _ring(tp_b["all_reduce"], "all_reduce", lay.tp, n_micro * 2, link)
    t_dp = 0.0
    if lay.dp > 1:
        full = dense_step_bytes(stage, lay.tp, lay.dp_shard, lay.dp_replicate, s, gb, lay.micro_batch)
        units = unit_params(stage, lay.tp)
        if lay.schedule == "layered" and lay.pipelined:  # one gather per pass, not per micro-batch
            ag = 2 * sum(units) * 4
        else:
            ag = full["all_gather"] - tp_b.get("all_gather", 0)
        rs = sum(units) * 4 if lay.dp_shard > 1 else 0
        shard_link = topo.link(lay.tp * lay.dp_shard)
        if lay.dp_shard > 1:
            t_dp += _ring(ag * e / 4, "all_gather", lay.dp_shard, n_micro * (2 * L + 1), shard_link)
            t_dp += _ring(rs, "reduce_scatter", lay.dp_shard, L + 1, shard_link)
        if lay.dp_replicate > 1:
            t_dp += _ring(sum(units) // lay.dp_shard * 4, "all_reduce", lay.dp_replicate, L + 1,
                          topo.link(lay.tp * lay.dp))
    t_p2p = 0.0
    v = INTERLEAVE if lay.schedule == "interleaved" else (a.n_layers // lay.pp if lay.schedule == "layered" else 1)
    if lay.pp > 1:
        link = topo.link(lay.tp * lay.dp * 2)
        msg = e * lay.micro_batch * s * a.dim / lay.tp
        t_p2p = 2 * n_micro * v * (msg / link.bandwidth + link.latency)
    t_ep = 0.0
    if lay.ep > 1 and a.moe_experts:
        moe_blocks = len(a.moe_layer_ids()) // lay.pp
        msg = lay.micro_batch * s * a.moe_top_k * a.dim * e / lay.tp
        t_ep = _ring(4 * n_micro * moe_blocks * msg, "all_to_all", lay.ep, 4 * n_micro * moe_blocks, topo.link(lay.ep))
    if lay.pp > 1:
        bubble = (lay.pp - 1) / (v * n_micro)
    else:
        bubble = 0.0
    exposed_dp = max(0.0, t_dp - t_c) if dev.overlap else t_dp
    total = (t_c + t_tp + t_ep + t_p2p) * (1 + bubble) + exposed_dp
    return total, {"compute": t_c, "tp": t_tp, "dp": t_dp, "dp_exposed": exposed_dp, "pp_p2p": t_p2p, "ep": t_ep,
                   "bubble": (t_c + t_tp + t_ep + t_p2p) * bubble, "bubble_fraction": bubble / (1 + bubble)}


def estimate(cfg: Config, lay: Layout, topo: Topology, a=None) -> Estimate:
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
    topo: Topology
    gpus: int


def plan(cfg: Config, gpus: int, topo: Topology, **kw) -> Plan:
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    a = model_args(cfg)
    layouts, refused = candidate_layouts(cfg, gpus, topo, **kw)
    if not layouts:
        raise UserError(f"no valid layout of this config on {gpus} GPUs ({refused} refused by the pre-flight "
                        "checks); check train.global_batch (it must split over dp x micro_batch) and the model's "
                        "divisibility by tp and pp")
    ests = [estimate(cfg, lay, topo, a) for lay in layouts]
    ests.sort(key=lambda x: -x.tokens_per_s)
    return Plan([x for x in ests if x.fits], [x for x in ests if not x.fits], refused, topo, gpus)


def format_plan(p: Plan, cfg: Config, top: int = 10, too_big: int = 5) -> str:
    a = model_args(cfg)
    from .model import count_params

    d = p.topo.device
    lines = [f"plan: {count_params(a)['total'] / 1e9:.3g}B parameters, seq {cfg.data.seq_len}, global batch "
             f"{cfg.train.global_batch} on {p.gpus} x {d.name} ({d.memory_bytes / GB:.0f} GB, peak "
             f"{d.peak_flops / 1e12:.4g} TFLOP/s x efficiency {d.efficiency:g}; {p.topo.gpus_per_node} per node, "
             f"{p.topo.intra.name} {p.topo.intra.bandwidth / GB:g} GB/s, {p.topo.inter.name} "
             f"{p.topo.inter.bandwidth / GB:g} GB/s)",
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

    cfg = load_config(args.config, args.overrides)
    if args.gpu not in GPU_CHOICES:
        raise UserError(f"--gpu {args.gpu!r}: use one of {', '.join(GPU_CHOICES)}")
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        raise UserError(f"--efficiency {args.efficiency}: must be in (0, 1]")
    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: must be at least 1")
    topo = (load_topology(args.topology, args.gpu, args.gpus, args.efficiency) if args.topology
            else default_topology(args.gpu, args.gpus, args.efficiency))
    kw = {}
    if args.micro_batch:
        kw["micro_batches"] = args.micro_batch
    print(format_plan(plan(cfg, args.gpus, topo, **kw), cfg, top=args.top))
