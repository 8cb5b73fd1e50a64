"""Run configuration: TOML sections, `--set section.key=value` overrides, validation.

Every field is declared once below (type, default, allowed range or choices, help), so
loading, overriding, validating and writing the resolved config share one table; the
`[c4]` thresholds are declared in `fault/settings.py` and the section derived from them. Errors
name the field and say how to fix it. Checks that need the world size (mesh product,
batch divisibility) live in dist_train/layout.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
import tomli_w

from .errors import ConfigError
from .fault.settings import C4Settings


def _f(default, help: str, *, min=None, max=None, choices=None, bools=None):
    """A config field; `bools` = (value for false, value for true) lets an older boolean
    form of a choice field keep working."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "bools": bools}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


DTYPES = ("auto", "fp32", "bf16")


@dataclass
class RunSection:
    name: str = _f("demo", "run name; the run directory is <dir>/<name>")
    dir: str = _f("runs", "parent folder of run directories")
    seed: int = _f(1234, "seed for weights, data order and dropout", min=0)


@dataclass
class ModelSection:
    preset: str = _f("tiny", "shape preset; fields set explicitly override it")
    dim: int = _f(64, "model width", min=8)
    n_layers: int = _f(4, "transformer blocks", min=1)
    n_heads: int = _f(4, "query heads", min=1)
    n_kv_heads: int = _f(2, "key/value heads (grouped-query attention)", min=1)
    vocab_size: int = _f(0, "vocabulary size; 0 = the tokenizer's, rounded up to a multiple of 64", min=0)
    ffn_dim: int = _f(0, "SwiGLU hidden size; 0 = 8/3 x dim rounded up to a multiple of 64", min=0)
    tie_embeddings: bool = _f(False, "share the embedding and output head weights")
    rope_theta: float = _f(10000.0, "RoPE base", min=1.0)
    rope_scaling: str = _f("none", "RoPE frequency scaling: none, or Llama 3's (rope_type 'llama3')",
                           choices=("none", "llama3"))
    rope_factor: float = _f(8.0, "llama3 RoPE scaling: how much slower the low frequencies turn", min=1.0)
    rope_low_freq_factor: float = _f(1.0, "llama3 RoPE scaling: wavelengths above original_max_len / this "
                                     "are scaled fully", min=0.0)
    rope_high_freq_factor: float = _f(4.0, "llama3 RoPE scaling: wavelengths below original_max_len / this "
                                      "are kept", min=0.0)
    rope_original_max_len: int = _f(8192, "llama3 RoPE scaling: the context length the model was pretrained "
                                    "with", min=1)
    norm_eps: float = _f(1e-5, "RMSNorm epsilon", min=0.0)
    init_std: float = _f(0.02, "std of the normal init of weight matrices", min=0.0)
    moe_experts: int = _f(0, "experts per MoE layer; 0 = dense model", min=0)
    moe_top_k: int = _f(2, "experts each token is routed to", min=1)
    moe_every: int = _f(1, "every n-th block is an MoE block", min=1)
    moe_aux_weight: float = _f(0.01, "weight of the Switch load-balancing loss (added per MoE layer)", min=0.0)
    moe_z_weight: float = _f(0.001, "weight of the router z-loss (mean squared log-sum-exp of router logits)", min=0.0)
    moe_capacity_factor: float = _f(0.0, "expert capacity = factor x tokens x top_k / experts, extra copies "
                                         "dropped; 0 = dropless", min=0.0)
    moe_shared_expert: bool = _f(False, "add one always-on SwiGLU expert (ffn_dim wide) to every MoE layer")
    init_from: str = _f("", "start from pretrained weights: 'hf:PATH' (a folder with config.json and *.safetensors "
                        "as save_pretrained writes it); its config.json sets the model's shape; empty = random init")


@dataclass
class DataSection:
    source: str = _f("bundled", "'bundled' (the stdlib corpus), a folder made by `dist-train prepare`, "
                     "'megatron:PREFIX' (Megatron-LM's PREFIX.bin + .idx), or 'parquet:GLOB' / 'jsonl:GLOB' (text "
                     "files, e.g. a local copy of a Hub dataset, tokenised once into the cache); 'mix' = data.mix")
    mix: dict = _f(dict, "several sources drawn with weights, e.g. { bundled = 0.7, \"megatron:/data/prefix\" = 0.3 } "
                   "(keys as data.source names them, weights > 0, normalised); deterministic, resumable on any dp "
                   "layout (data/mixture.py); data.source becomes 'mix' (if set, it must be 'mix' or one of the mix's sources); "
                   "empty = data.source alone")
    text_field: str = _f("text", "parquet:/jsonl: sources: the column or field holding the text")
    tokenizer: str = _f("byte", "'byte' or the path of a HF tokenizer.json")
    seq_len: int = _f(128, "tokens per sample", min=2)
    document_mask: bool = _f(False, "attention stays inside each document packed into a sample (EOS-delimited, the "
                             "tokenizer's eos ends a document) and RoPE positions restart at each document; false = "
                             "attend across documents, positions 0..seq_len-1")
    cache_dir: str = _f("", "where the bundled corpus is prepared; empty = ~/.cache/dist-train")
    verify: str = _f("background", "check every shard's full CRC32 once per run, spread over the ranks, in a "
                     "background thread (the run stops naming a damaged file); off = only the checks at open",
                     choices=("background", "off"))


@dataclass
class TrainSection:
    steps: int = _f(50, "optimizer steps", min=1)
    global_batch: int = _f(16, "samples per optimizer step over all data-parallel ranks", min=1)
    micro_batch: int = _f(2, "samples per forward/backward on one rank", min=1)
    optimizer: str = _f("adamw", "optimizer: AdamW (betas, weight decay decoupled) or plain SGD (momentum)",
                        choices=("adamw", "sgd"))
    lr: float = _f(3e-3, "peak learning rate", min=0.0)
    schedule: str = _f("cosine", "lr after warm-up: cosine or linear decay to min_lr_ratio, constant, or wsd "
                       "(stable, then linear decay over the last decay_ratio of steps)",
                       choices=("cosine", "wsd", "linear", "constant"))
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr", min=0.0, max=1.0)
    warmup: int = _f(5, "linear warm-up steps", min=0)
    decay_ratio: float = _f(0.2, "wsd: the fraction of train.steps at the end that decays", min=0.0, max=1.0)
    weight_decay: float = _f(0.1, "weight decay on matrices (AdamW: decoupled; SGD: L2)", min=0.0)
    beta1: float = _f(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = _f(0.95, "AdamW beta2", min=0.0, max=1.0)
    momentum: float = _f(0.0, "SGD momentum (train.optimizer = 'sgd')", min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "global gradient-norm clip; 0 = off", min=0.0)
    dtype: str = _f("auto", "compute dtype; auto = train.param_dtype if that is set, else fp32 on CPU and bf16 on "
                    "GPU (fp16 is not offered: it needs loss scaling)", choices=DTYPES)
    param_dtype: str = _f("auto", "dtype FSDP2 gathers the parameters in for forward and backward (FSDP2's "
                          "MixedPrecisionPolicy; the sharded weights and optimizer state stay fp32); auto = the "
                          "compute dtype; fp32 under bf16 compute = fp32 gathers, autocast to bf16", choices=DTYPES)
    reduce_dtype: str = _f("auto", "dtype FSDP2 reduces gradients in (reduce-scatter over dp_shard, all-reduce over "
                           "dp_replicate); auto = fp32; no effect without data parallelism", choices=DTYPES)
    compile: bool = _f(False, "torch.compile each transformer block (per block, after tensor parallelism, before "
                       "FSDP); compiled before step 1, its time is the first record's compile_s, not step_time_s")
    compile_backend: str = _f("inductor", "torch.compile backend: inductor (generated kernels), or aot_eager (the "
                              "same graph capture and autograd, run by eager kernels: a quick check)",
                              choices=("inductor", "aot_eager"))
    activation_checkpoint: str = _f("none", "recompute in backward, per block and micro-batch: none, full (the "
                                    "whole block), selective (keep matmul and attention outputs, recompute "
                                    "the elementwise ops); true/false mean full/none",
                                    choices=("none", "full", "selective"), bools=("none", "full"))


@dataclass
class ParallelSection:
    dp_replicate: int = _f(1, "replicated data-parallel degree (HSDP outer dim)", min=1)
    dp_shard: int = _f(-1, "sharded data-parallel degree (FSDP); -1 = every rank the others leave", min=-1)
    tp: int = _f(1, "tensor-parallel degree", min=1)
    pp: int = _f(1, "pipeline-parallel degree", min=1)
    pp_schedule: str = _f("1f1b", "pipeline schedule", choices=("gpipe", "1f1b", "interleaved", "layered"))
    ep: int = _f(1, "expert-parallel degree (borrows dp_shard x tp ranks)", min=1)
    a2a: str = _f("flat", "MoE all-to-all", choices=("flat", "hierarchical"))
    placement: str = _f("auto", "which rank holds which mesh coordinate: auto = with a [topology], tp (and ep) inside a "
                        "node, dp_shard inside a cluster where it fits, pp / dp_replicate / diloco over the slow links "
                        "(dist_train/topology.py); without one, and ordered, = coordinates row-major by rank",
                        choices=("auto", "ordered"))


@dataclass
class TopologySection:
    file: str = _f("", "a TOML file holding a [topology] table (`--topology FILE` sets it); its keys fill the fields "
                   "below that the config does not set")
    nodes: int = _f(0, "nodes the topology describes; 0 = the launch's (else it must equal --nodes / --nnodes)", min=0)
    clusters: int = _f(1, "clusters of consecutive nodes (must divide the node count); see cluster_map", min=1)
    cluster_map: dict = _f(dict, "cluster name -> node indices (node = rank // LOCAL_WORLD_SIZE, as the launcher "
                           "numbers them), e.g. { a = [0, 2], b = [1, 3] }; every node once, equal sizes; instead of "
                           "clusters")
    links: dict = _f(dict, "per link class (intra_node, intra_cluster, inter_cluster) its bandwidth and latency, e.g. "
                     "{ inter_cluster = { bandwidth_gbps = 1.0, latency_ms = 2.0 } }; a class not given is not slowed")
    simulate: str = _f("auto", "slow every op whose group crosses a link class with a bandwidth or latency down to it "
                       "(latency per ring step + wire bytes / bandwidth): on, off, or auto = under `dist-train local` "
                       "(simulated nodes)", choices=("auto", "on", "off"))


@dataclass
class DilocoSection:
    enabled: bool = _f(False, "synchronise replicas with DiLoCo every inner_steps (parallel/diloco.py)")
    replicas: int = _f(1, "DiLoCo replicas (the outermost mesh dim); each trains its share of the global batch",
                       min=1)
    inner_steps: int = _f(100, "H: inner steps between outer synchronisations", min=1)
    outer_lr: float = _f(0.7, "outer Nesterov learning rate", min=0.0)
    outer_momentum: float = _f(0.9, "outer Nesterov momentum", min=0.0, max=1.0)
    quantize: str = _f("none", "pseudo-gradient payload: fp32, bf16, or int8 with a per-256 scale",
                       choices=("none", "bf16", "int8"))
    fragments: int = _f(1, "F: layer-contiguous fragments synced one at a time, H / F inner steps apart "
                        "(Streaming DiLoCo); 1 = plain DiLoCo", min=1)
    overlap: bool = _f(False, "streaming only: a fragment's exchange runs during the next inner steps and its "
                       "update is applied 2 steps later")
    mix: float = _f(0.5, "with overlap: a fragment's local parameters become mix x local + (1 - mix) x global",
                    min=0.0, max=1.0)
    offload: bool = _f(False, "keep the global parameters and outer momentum on the CPU")
    reject_factor: float = _f(10.0, "reject a replica's pseudo-gradient whose norm exceeds this x the running "
                              "median of past ones (or is not finite); 0 = only non-finite", min=0.0)


@dataclass
class ElasticSection:
    lighthouse: str = _f("", "HOST:PORT of the lighthouse (`dist-train lighthouse`); empty = fixed replicas in one job")
    replica_id: str = _f("", "this replica's name, unique among the replicas (each replica is its own job)")
    min_replicas: int = _f(1, "an outer step needs at least this many replicas", min=1)
    heartbeat_s: float = _f(0.1, "seconds between a replica's heartbeats to the lighthouse", min=0.01)
    join_timeout_s: float = _f(60.0, "`dist-train local --replicas`: the lighthouse waits this long for live "
                               "replicas before forming a quorum without them; a live one later than this misses the "
                               "round and heals at the next, so keep it above H x the step time", min=0.1)
    quorum_timeout_s: float = _f(120.0, "a replica waits this long for a quorum at an outer step (it must exceed "
                                 "H x the step time: peers arrive up to a round apart); then it stops", min=1.0)
    timeout_s: float = _f(30.0, "a cross-replica transfer that makes no progress this long means a member left",
                          min=1.0)


@dataclass
class EvalSection:
    every: int = _f(0, "evaluate every n steps (and at the end) on a held-out split; 0 = off, nothing held out",
                    min=0)
    batches: int = _f(4, "global batches in the held-out split (the last samples of the data, never trained on)",
                      min=1)
    params: str = _f("global", "under DiLoCo: evaluate the global (outer) parameters, or each replica's own "
                     "(local; the eval loss is their mean)", choices=("global", "local"))


@dataclass
class CheckpointSection:
    every: int = _f(0, "save every n steps (and at the end); 0 = never", min=0)
    keep: int = _f(3, "complete checkpoints kept", min=1)
    resume: str = _f("latest", "'latest' (if any), 'none' (refuse an existing run), or a checkpoint path")
    async_: str = _f("off", "write checkpoints in the background after staging a copy (DCP async_save in a "
                     "thread or a process); latest moves once every rank's files are on disk",
                     choices=("off", "thread", "process"))  # the key is `async` (a Python keyword)


def _c4_section() -> type:
    """`[c4]`: `enabled`, then every C4Settings field with its default, help and range
    (fault/ cannot import the config, so the thresholds are declared there, once)."""
    types = {bool: "bool", int: "int", float: "float", str: "str"}
    cls = dataclasses.make_dataclass("C4Section", [
        ("enabled", "bool", _f(False, "watch collectives and name hung or slow ranks and links")),
        *[(f.name, types.get(f.type, f.type), field(default=f.default, metadata=f.metadata))
          for f in dataclasses.fields(C4Settings)]])
    cls.__module__ = __name__
    return cls


C4Section = _c4_section()


@dataclass
class FaultSection:
    inject: list = _f(list, "fault injections for drills, e.g. ['delay:rank=1,ms=50']")


@dataclass
class KernelsSection:
    backend: str = _f("auto", "kernel backend; auto = Triton on CUDA, torch elsewhere", choices=("auto", "torch", "triton"))


@dataclass
class MetricsSection:
    progress: bool = _f(True, "progress bar on rank 0")
    tensorboard: bool = _f(False, "also write TensorBoard event files (needs the tensorboard extra)")
    log_every: int = _f(1, "write metrics every n steps", min=1)
    report: bool = _f(True, "draw the report PNGs when the run ends")
    noise_scale: bool = _f(False, "estimate the gradient noise scale B_simple (McCandlish et al. 2018) from each "
                           "micro-batch's and the step's gradient norms: no extra collective, but a norm of every "
                           "gradient per micro-batch; null under tp or ep > 1 and with one micro-batch per step")
    noise_scale_ema: float = _f(0.95, "noise scale: EMA factor applied to its estimates of the squared gradient "
                                "norm and of tr(Sigma) separately (0 = this step's alone)", min=0.0, max=0.999)
    wandb: bool = _f(False, "also log every metrics.jsonl key to Weights & Biases from rank 0 (needs the wandb extra)")
    wandb_project: str = _f("dist-train", "W&B project")
    wandb_entity: str = _f("", "W&B entity (team or user); empty = your default entity")
    wandb_name: str = _f("", "W&B run name; empty = run.name")
    wandb_group: str = _f("", "W&B run group (e.g. one sweep); empty = none")
    wandb_tags: list = _f(list, "W&B run tags, e.g. ['fsdp', 'baseline']")
    wandb_mode: str = _f("online", "W&B mode: online, offline (files under <run dir>/wandb, `wandb sync` later) or "
                         "disabled", choices=("online", "offline", "disabled"))


SECTIONS = {
    "run": RunSection, "model": ModelSection, "data": DataSection, "train": TrainSection,
    "parallel": ParallelSection, "topology": TopologySection, "diloco": DilocoSection, "elastic": ElasticSection, "eval": EvalSection,
    "checkpoint": CheckpointSection,
    "c4": C4Section, "fault": FaultSection, "kernels": KernelsSection, "metrics": MetricsSection,
}


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    topology: TopologySection = field(default_factory=TopologySection)
    diloco: DilocoSection = field(default_factory=DilocoSection)
    elastic: ElasticSection = field(default_factory=ElasticSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    c4: C4Section = field(default_factory=C4Section)
    fault: FaultSection = field(default_factory=FaultSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    @property
    def run_dir(self) -> Path:
        """<dir>/<name>, and for a replica of an elastic job <dir>/<name>/replica-<id>."""
        base = Path(self.run.dir) / self.run.name
        return base / f"replica-{self.elastic.replica_id}" if self.elastic.lighthouse else base

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config; a topology file's keys are in [topology] already, so its path is
        left out (the run directory's config.toml loads without the file)."""
        d = self.to_dict()
        d["topology"]["file"] = ""
        return tomli_w.dumps({sec: {_key(k): v for k, v in body.items()} for sec, body in d.items()})


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(options)}"


def _key(name: str) -> str:
    """A field's config key: its name, less the `_` a Python keyword needs (`async_`)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _field_spec(section: str, key: str) -> dataclasses.Field:
    cls = SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"unknown config section [{section}]{_suggest(section, SECTIONS)}")
    fields = {_key(f.name): f for f in dataclasses.fields(cls)}
    fields.update({f.name: f for f in dataclasses.fields(cls)})  # `async_` as config.toml holds it
    if key not in fields:
        raise ConfigError(f"unknown config key {section}.{key}{_suggest(key, fields)}")
    return fields[key]


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            dict: "a table, e.g. { a = 1 }"}[t]


def _coerce(section: str, key: str, value: Any) -> Any:
    """Check one value against its field's declared type, range and choices."""
    spec = _field_spec(section, key)
    kind = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}[spec.type]
    where = f"{section}.{key} = {value!r}"
    if spec.metadata.get("bools") and isinstance(value, bool):
        value = spec.metadata["bools"][value]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}: must be {_type_name(kind)} ({spec.metadata['help']})")
    meta = spec.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{where}: must be one of {', '.join(map(repr, meta['choices']))}"
                          f"{_suggest(str(value), meta['choices'])}")
    if meta["min"] is not None and value < meta["min"]:
        raise ConfigError(f"{where}: must be >= {meta['min']} ({meta['help']})")
    if meta["max"] is not None and value > meta["max"]:
        raise ConfigError(f"{where}: must be <= {meta['max']} ({meta['help']})")
    return value


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` with value as a TOML literal; bare words are strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.steps=20")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass a TOML file such as configs/tiny.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass a TOML file such as configs/tiny.toml") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def build_config(raw: dict, overrides: list[tuple[str, str, Any]] = ()) -> Config:
    """Config from nested dict + overrides; model presets fill fields not set explicitly."""
    from .model import MODEL_PRESETS

    flat: dict[tuple[str, str], Any] = {}
    for section, body in raw.items():
        if not isinstance(body, dict):
            raise ConfigError(f"config entry {section!r} must be a [section] table{_suggest(section, SECTIONS)}")
        for key, value in body.items():
            flat[(section, key)] = _coerce(section, key, value)
    for section, key, value in overrides:
        flat[(section, key)] = _coerce(section, key, value)

    cfg = Config()
    preset = flat.get(("model", "preset"), cfg.model.preset)
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset = {preset!r} is not a preset{_suggest(preset, MODEL_PRESETS)}")
    for key, value in MODEL_PRESETS[preset].items():
        setattr(cfg.model, key, value)
    file = flat.get(("topology", "file"))
    if file:  # a topology file fills the [topology] fields not set explicitly
        from .topology import read_topology_file

        for key, value in read_topology_file(file).items():
            try:
                flat.setdefault(("topology", key), _coerce("topology", key, value))
            except ConfigError as e:
                raise ConfigError(f"topology file {file}: {e}") from None
    for (section, key), value in flat.items():
        setattr(getattr(cfg, section), _field_spec(section, key).name, value)
    if cfg.model.init_from:
        _apply_init_from(cfg, flat)
    _apply_mix(cfg, flat)
    _validate(cfg)
    return cfg


def _apply_init_from(cfg: Config, flat: dict) -> None:
    """`model.init_from = "hf:PATH"`: its config.json fixes the model's shape (vocabulary
    exactly, RoPE, norm eps; dist_train/interop/hf_config.py); a field set to something
    else is refused, naming both."""
    from .interop.hf_config import CONFIG, HF_KEY, model_fields, parse_init_from

    folder = parse_init_from(cfg.model.init_from)
    for key, value in model_fields(folder).items():
        mine = flat.get(("model", key), value)
        if mine != value:
            raise ConfigError(f"model.{key} = {mine!r} conflicts with model.init_from: {folder / CONFIG} has "
                              f"{HF_KEY.get(key, key)} = {value!r} (the pretrained weights fix the shape); remove "
                              f"model.{key} from the config")
        setattr(cfg.model, key, value)


MIX_SOURCE = "mix"


def _apply_mix(cfg: Config, flat: dict) -> None:
    """`data.mix`: every key a source data.source could name, every weight a positive number;
    data.source becomes 'mix' (set beside a mix it must be 'mix' or one of the mix's sources,
    so a config file's own data.source can stay when --set adds a mix over it)."""
    from dist_train.data.sources import FILE_KINDS

    mix, source = cfg.data.mix, cfg.data.source
    example = "e.g. data.mix = { bundled = 0.7, \"megatron:/data/corpus_text_document\" = 0.3 }"
    if not mix:
        if source == MIX_SOURCE:
            raise ConfigError(f"data.source = 'mix' but data.mix is empty; set data.mix ({example}) or data.source")
        return
    for name, weight in mix.items():
        kind, sep, rest = str(name).partition(":")
        known = name == "bundled" or (sep and (kind in FILE_KINDS or kind == "megatron") and rest) or (
            Path(name).expanduser().is_dir())
        if not known:
            raise ConfigError(f"data.mix: unknown source {name!r}; use 'bundled', a folder made by `dist-train "
                              "prepare`, 'megatron:PREFIX', 'parquet:GLOB' or 'jsonl:GLOB'")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ConfigError(f"data.mix: the weight of {name!r} is {weight!r}; weights must be positive numbers "
                              f"({example})")
    if ("data", "source") in flat and source != MIX_SOURCE and source not in mix:
        raise ConfigError(f"data.source = {source!r} is not one of data.mix's sources ({', '.join(map(repr, mix))}); "
                          "set data.source = 'mix' (or to one of them), or remove data.mix")
    if cfg.eval.every:
        raise ConfigError(f"eval.every = {cfg.eval.every} with data.mix: the held-out split is not built for "
                          "mixtures yet; set eval.every = 0 or use data.source alone")
    cfg.data.source = MIX_SOURCE


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw = _read_toml(Path(path)) if path else {}
    return build_config(raw, [parse_override(o) for o in overrides])


def load_runs(path: str | Path | None, overrides: list[str], runs_file: str | None) -> list[Config]:
    """The config, or with a runs file (a JSON list of lists of `section.key=value`) one
    config per entry, each entry's overrides applied after the command line's. Runs go in
    order; a later run with an earlier one's run.name continues it (checkpoint.resume)."""
    if not runs_file:
        return [load_config(path, overrides)]
    import json

    try:
        runs = json.loads(Path(runs_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--runs {runs_file}: cannot read it as JSON ({e})") from None
    if not isinstance(runs, list) or not runs or not all(
            isinstance(r, list) and all(isinstance(o, str) for o in r) for r in runs):
        raise ConfigError(f"--runs {runs_file}: must be a non-empty JSON list of lists of "
                          '"section.key=value" strings, e.g. [["run.name=a"], ["run.name=b", "parallel.tp=2"]]')
    return [load_config(path, list(overrides) + r) for r in runs]


def resolve_dtypes(t: TrainSection, device_type: str) -> tuple[str, str, str]:
    """(compute, param, reduce) dtypes of a run on `device_type` ("cpu" or "cuda"), as
    names: an "auto" train.dtype follows an explicit train.param_dtype and an "auto"
    param_dtype the compute dtype, else the device decides (fp32 on CPU, bf16 on GPU);
    reduce "auto" is fp32. The defaults give bf16 parameters with fp32 reductions on GPU
    and fp32 everywhere on CPU."""
    compute = t.dtype if t.dtype != "auto" else t.param_dtype if t.param_dtype != "auto" else (
        "bf16" if device_type == "cuda" else "fp32")
    param = t.param_dtype if t.param_dtype != "auto" else compute
    return compute, param, t.reduce_dtype if t.reduce_dtype != "auto" else "fp32"


def _validate(cfg: Config) -> None:
    """Checks across fields that hold whatever the world size."""
    m, t = cfg.model, cfg.train
    if t.dtype == "fp32" and t.param_dtype == "bf16":
        raise ConfigError("train.param_dtype = 'bf16' with train.dtype = 'fp32': FSDP2 computes with the parameters "
                          "it gathers, so the compute would be bf16; set train.dtype = 'bf16' (or 'auto'), or "
                          "train.param_dtype = 'fp32'")
    if t.compile and m.moe_experts:
        raise ConfigError(f"train.compile = true with model.moe_experts = {m.moe_experts}: routing tokens to experts "
                          "has data-dependent shapes (tokens per expert), which would recompile the block every "
                          "step; set train.compile = false for MoE models")
    if t.compile and cfg.metrics.noise_scale:
        raise ConfigError("metrics.noise_scale = true with train.compile = true: the noise scale reads each "
                          "micro-batch's gradients through hooks it adds at forward time, which a compiled block "
                          "cannot trace; set train.compile = false to measure the noise scale, or "
                          "metrics.noise_scale = false")
    if t.compile and cfg.kernels.backend == "triton":
        raise ConfigError("train.compile = true with kernels.backend = 'triton': compiled blocks trace the torch "
                          "implementations of the ops (the compiler generates its own fused kernels), the "
                          "hand-written Triton kernels are not traced; set kernels.backend = 'auto' (Triton for the "
                          "head and loss outside the blocks) or train.compile = false")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim = {m.dim} is not divisible by model.n_heads = {m.n_heads}; "
                          "choose n_heads dividing dim")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} is odd; RoPE needs an even head dim")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads = {m.n_kv_heads} must divide model.n_heads = {m.n_heads}")
    if m.rope_scaling == "llama3" and not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor = {m.rope_high_freq_factor:g} must exceed "
                          f"model.rope_low_freq_factor = {m.rope_low_freq_factor:g} (llama3 RoPE scaling interpolates "
                          "between them)")
    if m.moe_experts and m.moe_top_k > m.moe_experts:
        raise ConfigError(f"model.moe_top_k = {m.moe_top_k} exceeds model.moe_experts = {m.moe_experts}; "
                          f"set model.moe_top_k <= {m.moe_experts}")
    if t.global_batch % t.micro_batch:
        raise ConfigError(f"train.global_batch = {t.global_batch} is not divisible by train.micro_batch = "
                          f"{t.micro_batch}; make global_batch a multiple of micro_batch")
    if t.schedule == "wsd" and t.warmup + round(t.decay_ratio * t.steps) > t.steps:
        raise ConfigError(f"train.warmup = {t.warmup} plus the wsd decay (train.decay_ratio = {t.decay_ratio:g} of "
                          f"{t.steps} steps = {round(t.decay_ratio * t.steps)}) exceed train.steps = {t.steps}; "
                          "lower train.warmup or train.decay_ratio")
    if cfg.topology.links:
        from .topology import check_links

        check_links(cfg.topology.links)
    if cfg.parallel.dp_shard == 0:
        raise ConfigError("parallel.dp_shard = 0: use a positive degree or -1 for every rank the others leave")
    r = cfg.checkpoint.resume
    if r not in ("latest", "none") and not Path(r).exists():
        raise ConfigError(f"checkpoint.resume = {r!r}: no such checkpoint; use 'latest', 'none' or an existing path")
    if cfg.fault.inject:
        from dist_train.fault.inject import InjectError, parse_specs

        try:
            parse_specs(cfg.fault.inject)
        except InjectError as e:
            raise ConfigError(f"fault.inject: {e}") from None
    e = cfg.elastic
    if e.lighthouse:
        if not cfg.diloco.enabled:
            raise ConfigError("elastic.lighthouse is set but diloco.enabled = false: elastic membership is for DiLoCo "
                              "replicas; set diloco.enabled = true, or clear elastic.lighthouse")
        if cfg.diloco.replicas != 1:
            raise ConfigError(f"diloco.replicas = {cfg.diloco.replicas} with elastic.lighthouse: each elastic replica is "
                              "its own job (dist-train local --replicas R starts R of them); set diloco.replicas = 1")
        if cfg.diloco.fragments != 1 or cfg.diloco.overlap:
            raise ConfigError("elastic replicas sync whole (diloco.fragments = 1, diloco.overlap = false); streaming "
                              "fragments are for fixed replicas")
        if not e.replica_id or "/" in e.replica_id:
            raise ConfigError(f"elastic.replica_id = {e.replica_id!r}: each replica needs a plain name, e.g. "
                              "--set elastic.replica_id=a")
        if ":" not in e.lighthouse.split("//")[-1]:
            raise ConfigError(f"elastic.lighthouse = {e.lighthouse!r}: expected HOST:PORT, e.g. 127.0.0.1:29510")
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        raise ConfigError(f"run.name = {cfg.run.name!r}: must be a plain folder name, e.g. 'tiny-1'")


def config_table() -> str:
    """Every config key as the README's markdown table (tests/test_config.py keeps the
    README equal to it; regenerate with `python -m dist_train.config`)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            meta = f.metadata
            help_ = meta["help"] + (f" ({', '.join(map(str, meta['choices']))})" if meta.get("choices") else "")
            rows.append(f"| `{section}.{_key(f.name)}` | `{default!r}` | {help_.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(config_table(), end="")
