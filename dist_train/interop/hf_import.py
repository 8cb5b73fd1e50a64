"""`model.init_from = "hf:PATH"`: HF Llama safetensors into a model of any layout.

The trainer calls `load_hf_weights` once, after the model is parallelised and
initialised. The model's parameters (plain tensors, or DTensors sharded by FSDP2 and
tensor parallelism, or a pipeline stage's subset) are handed to
`torch.distributed.checkpoint.load` under their HF names (dist_train/interop/hf_names.py)
with torch's `HuggingFaceStorageReader`: DCP plans, per rank, the slice of each tensor
that rank's shard holds, and the reader reads just that slice from the safetensors file
(`safe_open(...).get_slice`), so no rank reads a tensor it does not hold a part of, nor
materialises the model. Values are copied into the parameters' dtype (bf16 files load
into fp32 master weights exactly).

Before anything is read, the files' headers are checked against the model built from
config.json: a tensor the model needs and no file holds, a shape that differs, or a
tensor the model has no place for (a bias, say) ends in one line naming the file and the
tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .errors import InteropError
from .hf_config import PREFIX, parse_init_from
from .hf_names import IGNORED_SUFFIXES, to_hf


def _reader(folder: Path):
    try:
        import safetensors  # noqa: F401  (the reader imports it lazily; say so here, once)
    except ImportError:
        raise InteropError("model.init_from = 'hf:...' needs the safetensors package; install dist-train's hf "
                           "extra: pip install 'dist-train[hf]'") from None
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not any(folder.glob("*.safetensors")):
        raise InteropError(f"{folder} holds no *.safetensors file; save the model with save_pretrained "
                           "(safe_serialization, the default) or point model.init_from at the folder holding them")
    return HuggingFaceStorageReader(str(folder))


def hf_tensor_index(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor in the folder's safetensors files: name -> (shape, file name)."""
    reader = _reader(folder)
    try:
        meta = reader.read_metadata()
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise InteropError(f"{folder}: cannot read the safetensors headers ({e}); re-save the checkpoint") from None
    files = {idx.fqn: Path(info.relative_path).name for idx, info in reader.storage_data.items()}
    return {k: (tuple(m.size), files.get(k, "?")) for k, m in meta.state_dict_metadata.items()}


def expected_hf_names(args) -> set[str]:
    """The HF names the whole model (every pipeline stage) reads."""
    from ..model import Transformer

    with torch.device("meta"):
        whole = Transformer(args)
    return {hf for name, _ in whole.named_parameters() for hf, _ in to_hf(name, args.moe_experts)}


def check_files(folder: Path, args, wanted: dict[str, tuple[int, ...]]) -> None:
    """The files hold every tensor in `wanted` (HF name -> shape) with that shape, and
    nothing the model has no place for."""
    index = hf_tensor_index(folder)
    for hf, shape in wanted.items():
        if hf not in index:
            raise InteropError(f"{folder}: no *.safetensors file holds {hf!r}, which the model built from its "
                               "config.json needs" + (" (tie_word_embeddings = false needs lm_head.weight)"
                                                      if hf == "lm_head.weight" else "")
                               + "; the files and config.json do not belong together")
        got, file = index[hf]
        if got != tuple(shape):
            raise InteropError(f"{folder}/{file}: {hf} has shape {list(got)}, but the model built from config.json "
                               f"needs {list(shape)}; the files and config.json do not belong together")
    expected = expected_hf_names(args)
    for hf, (_, file) in sorted(index.items()):
        if hf in expected or hf.endswith(IGNORED_SUFFIXES) or (args.tie_embeddings and hf == "lm_head.weight"):
            continue
        raise InteropError(f"{folder}/{file} holds {hf!r}, which dist-train's Llama has no place for (a bias or "
                           "another architecture's tensor); import a checkpoint whose config.json and tensors "
                           "match LlamaForCausalLM without biases")


@torch.no_grad()
def load_hf_weights(model: nn.Module, init_from: str | Path, args) -> None:
    """Overwrite `model`'s parameters (this rank's shards of them) with the checkpoint's.

    `init_from` is "hf:PATH" or the folder; `args` the ModelArgs the model was built with
    (from that config.json). Every rank of the job calls it (DCP plans collectively)."""
    folder = parse_init_from(init_from) if str(init_from).startswith(PREFIX) else Path(init_from)
    if args.moe_experts:
        raise InteropError("model.init_from imports dense Llama checkpoints; this model has MoE layers "
                           "(model.moe_experts > 0)")
    state = {}
    for name, p in model.named_parameters():
        (hf, _), = to_hf(name)
        state[hf] = p
    check_files(folder, args, {hf: tuple(p.shape) for hf, p in state.items()})
    dcp_load(state, _reader(folder))


def dcp_load(state: dict, reader) -> None:
    """`dcp.load`, collectively when a process group is up, else in this process (without
    DCP's warning that it assumes so: here that is the intent)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    single = not torch.distributed.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=single)
