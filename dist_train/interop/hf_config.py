"""A transformers `config.json` <-> dist-train's `[model]` fields.

Import (`model_fields`) reads a Llama config.json into the fields that fix the model's
shape, so `model.init_from = "hf:PATH"` needs no shape in the TOML, and the layout checks
see the real one. Anything dist-train's model would compute differently is refused with
one line naming the key (another architecture, another rope type, biases, a head_dim
other than hidden_size / num_attention_heads, dropout, a partial rotary factor): loading
it anyway would be a silent approximation.

Defaults that differ between the two (documented because they bite):
- `rms_norm_eps`: transformers' LlamaConfig defaults to 1e-6, dist-train to 1e-5; a
  config.json without the key gets 1e-6 (what transformers would use).
- vocabulary: with `model.vocab_size = 0` dist-train pads the tokenizer's vocabulary to a
  multiple of 64; with init_from the config's `vocab_size` is used exactly (the embedding
  has that many rows), and data whose tokenizer has more ids is refused.
- RoPE: transformers 5 writes `rope_parameters` (`rope_type`, `rope_theta`, and for
  "llama3" `factor`, `low_freq_factor`, `high_freq_factor`,
  `original_max_position_embeddings`); older files have `rope_theta` and `rope_scaling`.
  Both are read; export writes both (the same values), so transformers 4 and 5 load it.
- `tie_word_embeddings` absent means false (LlamaConfig's default).

Export (`llama_config`, `mixtral_config`) writes the inverse from a run's `ModelArgs`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import InteropError

PREFIX = "hf:"
CONFIG = "config.json"

# our [model] field -> its key in a Llama config.json (for messages and for export)
HF_KEY = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "ffn_dim": "intermediate_size",
    "tie_embeddings": "tie_word_embeddings", "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_parameters.rope_theta", "rope_scaling": "rope_parameters.rope_type",
    "rope_factor": "rope_parameters.factor", "rope_low_freq_factor": "rope_parameters.low_freq_factor",
    "rope_high_freq_factor": "rope_parameters.high_freq_factor",
    "rope_original_max_len": "rope_parameters.original_max_position_embeddings",
    "moe_experts": "num_local_experts",
}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def parse_init_from(spec: str) -> Path:
    """The folder named by `model.init_from = "hf:PATH"`."""
    if not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
        raise InteropError(f"model.init_from = {spec!r}: expected 'hf:PATH' (a folder with config.json and "
                           "*.safetensors, as transformers' save_pretrained writes it)")
    folder = Path(spec[len(PREFIX):]).expanduser()
    if not folder.is_dir():
        raise InteropError(f"model.init_from = {spec!r}: {folder} is not a folder; point it at the folder holding "
                           "config.json and the *.safetensors files")
    return folder


def read_config_json(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InteropError(f"{path} does not exist; a HF checkpoint folder holds config.json beside its "
                           "*.safetensors (save_pretrained writes both)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path} is not valid JSON ({e}); fix or re-save the checkpoint") from None
    if not isinstance(raw, dict):
        raise InteropError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _get(cfg: dict, key: str, kind, where: Path, default=None):
    """cfg[key] checked against `kind`; absent (or null) gives `default`, or with no
    default one line naming the key."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise InteropError(f"{where}: missing key {key!r}; dist-train needs it to build the model")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InteropError(f"{where}: {key} = {value!r} should be {' or '.join(k.__name__ for k in kinds)}")
    return value


def _refuse(where: Path, key: str, value, why: str) -> None:
    raise InteropError(f"{where}: {key} = {value!r} cannot be represented by dist-train's model ({why}); "
                       "import a Llama checkpoint without it")


def _rope(cfg: dict, where: Path) -> dict:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (older) -> our fields."""
    params = cfg.get("rope_parameters")
    prefix = "rope_parameters"
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        prefix = "rope_scaling"
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise InteropError(f"{where}: {prefix} = {params!r} must be an object")
    if isinstance(params.get("full_attention"), dict):  # per-layer-type form: one type for every layer here
        params = params["full_attention"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise InteropError(f"{where}: {prefix}.rope_theta = {theta!r} must be a positive number")
    prf = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        _refuse(where, "partial_rotary_factor", prf, "every dimension of a head is rotated here")
    out = {"rope_theta": float(theta), "rope_scaling": "none"}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        _refuse(where, f"{prefix}.rope_type", rope_type, "only the default RoPE and rope_type 'llama3' are "
                                                           "implemented (kernels/rope.py)")
    for k in LLAMA3_KEYS:
        v = params.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise InteropError(f"{where}: {prefix}.{k} = {v!r}: rope_type 'llama3' needs a number there")
    original = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise InteropError(f"{where}: {prefix}.original_max_position_embeddings = {original!r} must be a positive "
                           "integer for rope_type 'llama3'")
    if not params["high_freq_factor"] > params["low_freq_factor"]:
        raise InteropError(f"{where}: {prefix}.high_freq_factor must exceed low_freq_factor (the interpolated band "
                           "lies between them)")
    out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]), rope_original_max_len=int(original))
    return out


def model_fields(folder: Path) -> dict[str, Any]:
    """The `[model]` fields a Llama config.json fixes (every one of them, so fields the
    user set can be compared), or one line naming the key dist-train cannot represent."""
    where = Path(folder) / CONFIG
    cfg = read_config_json(folder)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise InteropError(f"{where}: model_type = {model_type!r} (architectures {archs}) is not a Llama; "
                           "model.init_from imports LlamaForCausalLM checkpoints (model_type 'llama')")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        _refuse(where, "hidden_act", act, "the MLP is SwiGLU: silu(gate) * up")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, False):
            _refuse(where, key, cfg[key], "its projections have no bias")
    for key in ("attention_dropout", "hidden_dropout"):
        if cfg.get(key, 0.0) not in (0, 0.0, None):
            _refuse(where, key, cfg[key], "it has no dropout")
    dim = _get(cfg, "hidden_size", int, where)
    heads = _get(cfg, "num_attention_heads", int, where)
    kv = _get(cfg, "num_key_value_heads", int, where, default=heads)
    if dim % heads or heads % kv:
        raise InteropError(f"{where}: hidden_size = {dim}, num_attention_heads = {heads}, num_key_value_heads = "
                           f"{kv}: heads must divide hidden_size and kv heads must divide heads")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != dim // heads:
        _refuse(where, "head_dim", head_dim, f"a head is hidden_size / num_attention_heads = {dim // heads} wide")
    eps = _get(cfg, "rms_norm_eps", (int, float), where, default=1e-6)
    tied = _get(cfg, "tie_word_embeddings", bool, where, default=False)
    fields = {"dim": dim, "n_layers": _get(cfg, "num_hidden_layers", int, where), "n_heads": heads,
              "n_kv_heads": kv, "vocab_size": _get(cfg, "vocab_size", int, where),
              "ffn_dim": _get(cfg, "intermediate_size", int, where), "tie_embeddings": bool(tied),
              "norm_eps": float(eps), "moe_experts": 0, **_rope(cfg, where)}
    defaults = {"rope_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
                "rope_original_max_len": 8192}
    return {**defaults, **fields}


# ----------------------------------------------------------------------------- export


def _rope_params(a) -> dict:
    p = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling == "llama3":
        p.update(rope_type="llama3", factor=a.rope_factor, low_freq_factor=a.rope_low_freq_factor,
                 high_freq_factor=a.rope_high_freq_factor, original_max_position_embeddings=a.rope_original_max_len)
    return p


def _common(a, dtype: str, max_seq_len: int, eos_id: int | None) -> dict:
    rope = _rope_params(a)
    max_pos = max_seq_len
    if a.rope_scaling == "llama3":  # transformers warns unless the original context is below this
        max_pos = max(max_seq_len, int(math.ceil(a.rope_original_max_len * a.rope_factor)),
                      a.rope_original_max_len + 1)
    legacy = {k: v for k, v in rope.items() if k != "rope_theta"} if a.rope_scaling != "none" else None
    return {
        "hidden_size": a.dim, "intermediate_size": a.ffn_dim, "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
        "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "tie_word_embeddings": bool(a.tie_embeddings),
        "hidden_act": "silu", "attention_dropout": 0.0, "max_position_embeddings": max_pos,
        "initializer_range": a.init_std, "rope_parameters": rope,
        # the same RoPE in the keys transformers 4 reads
        "rope_theta": a.rope_theta, "rope_scaling": legacy,
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": dtype, "use_cache": True,
    }


def llama_config(a, *, dtype: str, max_seq_len: int, eos_id: int | None = None) -> dict:
    """config.json for LlamaForCausalLM from a dense model's ModelArgs."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **_common(a, dtype, max_seq_len, eos_id), "attention_bias": False, "mlp_bias": False,
            "pretraining_tp": 1}


def mixtral_config(a, *, dtype: str, max_seq_len: int, eos_id: int | None = None) -> dict:
    """config.json for MixtralForCausalLM from an MoE model's ModelArgs, or one line
    naming what Mixtral cannot hold."""
    why = None
    if a.moe_every != 1:
        why = f"model.moe_every = {a.moe_every}: Mixtral has experts in every block"
    elif a.moe_shared_expert:
        why = "model.moe_shared_expert = true: Mixtral has no shared expert"
    elif a.moe_capacity_factor:
        why = (f"model.moe_capacity_factor = {a.moe_capacity_factor:g}: Mixtral is dropless, so it would compute "
               "another function than the one trained")
    elif a.rope_scaling != "none":
        why = "model.rope_scaling = 'llama3': Mixtral's config has no such RoPE"
    if why:
        raise InteropError(f"export --format hf: this MoE model does not fit MixtralForCausalLM ({why}); "
                           "export it with --format torch")
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            **_common(a, dtype, max_seq_len, eos_id), "num_local_experts": a.moe_experts,
            "num_experts_per_tok": a.moe_top_k, "router_aux_loss_coef": a.moe_aux_weight,
            "router_jitter_noise": 0.0, "output_router_logits": False, "sliding_window": None}
