"""`dist-train export RUN_DIR [--step N] --format hf|torch --out DIR`.

A DCP checkpoint saved under any layout (dp_shard, tp, pp, ep: DCP stores each rank's
shards with their offsets in the whole tensor) becomes
- `--format hf`: config.json + safetensors (one file, or several with
  model.safetensors.index.json above `--max-shard-size`) that transformers loads with
  `LlamaForCausalLM.from_pretrained` (an MoE model: `MixtralForCausalLM`, where its shape
  fits; dist_train/interop/hf_config.py says what does not), names and layouts as in
  dist_train/interop/hf_names.py;
- `--format torch`: one consolidated `model.pt` (dist-train's parameter names, for
  `Transformer(args).load_state_dict`), with the run's config.toml beside it.

Streaming: no process group; each tensor is read in row blocks that follow the blocks the
checkpoint stored (an FSDP or expert shard is a block of rows; a tensor whose stored
chunks are column blocks, under tp, is read whole) through DCP's FileSystemReader with a
planner that asks for just those rows, and each block is written at once to its place in
the output. So exporting needs memory for about two stored chunks, not the model
(bench/export.py measures it). The checkpoint's manifest is verified first (sizes and
CRC32), and the output is built in a hidden sibling folder and renamed into place, so a
failed export leaves nothing half-written under --out.

Which parameters: a plain run's checkpoint holds them under `model.`; a DiLoCo run's under
`replica<r>.model.` (each replica's own, which drift apart between outer steps) and
`diloco.global.` (the outer parameters every replica agreed on at the last outer step).
Export takes `diloco.global.` by default, or replica R's with `--replica R`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import STEP_DIR, CheckpointError, step_dir_name, verify
from .errors import InteropError
from .hf_config import llama_config, mixtral_config
from .hf_names import to_hf
from .safetensors_stream import Entry, ShardedWriter

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD = 5 * 10**9  # save_pretrained's default (5GB)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    checkpoint: Path
    source: str          # which parameters: "model", "diloco.global", "replica1.model"
    files: tuple[str, ...]
    tensors: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        return (f"exported {self.tensors} tensors ({self.bytes / 1e6:,.1f} MB) of {self.checkpoint} "
                f"({self.source}) in {self.seconds:.1f} s\n  into {self.out}: {', '.join(self.files)}")


# ----------------------------------------------------------------------------- finding the checkpoint


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise InteropError(f"export: {run_dir} is not a run directory; pass the folder holding config.toml and "
                           "checkpoints/ (runs/<name>)")
    if step is not None:
        path = root / step_dir_name(step)
        if not path.is_dir():
            have = sorted(p.name for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []
            raise InteropError(f"export --step {step}: {path} does not exist (checkpoints: {', '.join(have) or 'none'})")
        return path
    latest = root / "latest"
    if latest.is_file():
        return root / latest.read_text().strip()
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []
    if not steps:
        raise InteropError(f"export: {run_dir} has no checkpoint under checkpoints/; train with "
                           "checkpoint.every > 0 (a run saves at its end then)")
    return steps[-1]


def _metadata(ckpt: Path):
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata


def choose_source(keys, replica: int | None) -> str:
    """The key prefix of the parameters to export (module docstring)."""
    if replica is not None:
        prefix = f"replica{replica}.model."
        if not any(k.startswith(prefix) for k in keys):
            have = sorted({k.split(".")[0] for k in keys if k.startswith("replica")})
            raise InteropError(f"export --replica {replica}: the checkpoint holds no {prefix[:-1]} "
                               f"({'replicas: ' + ', '.join(have) if have else 'it is not a DiLoCo run'})")
        return prefix
    for prefix in ("model.", "diloco.global."):
        if any(k.startswith(prefix) for k in keys):
            return prefix
    raise InteropError("export: the checkpoint holds no model parameters (no 'model.' or 'diloco.global.' keys); "
                       "is it a dist-train checkpoint?")


def run_args(run_dir: Path, shapes: dict[str, tuple[int, ...]]):
    """The run's ModelArgs from its config.toml, with the vocabulary the checkpoint has
    (padded as trained). Every parameter's shape is checked against it."""
    from ..config import build_config, tomllib
    from ..model import ModelArgs, Transformer

    path = Path(run_dir) / "config.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InteropError(f"export: {path} does not exist; the run directory holds the resolved config "
                           "the run wrote") from None
    # the run's fields are all written out: init_from and resume paths need not exist any more
    raw.get("model", {}).pop("init_from", None)
    raw.get("checkpoint", {}).pop("resume", None)
    cfg = build_config(raw)
    rows = shapes.get("tok_embeddings.weight", (0,))[0]
    args = dataclasses.replace(ModelArgs.from_config(cfg.model, cfg.data.seq_len, rows), vocab_size=rows)
    with torch.device("meta"):
        model = Transformer(args)
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = sorted(set(want) - set(shapes))
    if missing:
        raise InteropError(f"export: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) that "
                           f"{path}'s model has; the checkpoint and config.toml do not belong together")
    for n, s in want.items():
        if tuple(shapes[n]) != s:
            raise InteropError(f"export: {n} has shape {list(shapes[n])} in the checkpoint, {list(s)} in the model "
                               f"{path} describes; the checkpoint and config.toml do not belong together")
    return cfg, args, list(want)


# ----------------------------------------------------------------------------- reading rows


def row_blocks(md) -> list[tuple[int, int]]:
    """(first row, rows) blocks following the stored chunks when they are blocks of whole
    rows; the whole tensor otherwise."""
    size = tuple(md.size)
    rows = size[0] if size else 1
    whole_rows = all(tuple(c.offsets[1:]) == (0,) * (len(size) - 1) and tuple(c.sizes[1:]) == size[1:]
                     for c in md.chunks)
    if not size or not whole_rows:
        return [(0, rows)]
    cuts = sorted({0, rows} | {int(c.offsets[0]) for c in md.chunks} | {int(c.offsets[0] + c.sizes[0]) for c in md.chunks})
    return [(a, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]


def read_rows(ckpt: Path, key: str, md, row0: int, rows: int) -> torch.Tensor:
    """Rows [row0, row0 + rows) of checkpoint tensor `key`, reading only the stored chunks
    that overlap them."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    size = tuple(md.size)
    block = torch.empty((rows, *size[1:]) if size else (), dtype=md.properties.dtype)

    class Rows(DefaultLoadPlanner):
        def create_local_plan(self):
            offsets = torch.Size([row0] + [0] * (len(size) - 1)) if size else torch.Size([])
            return LoadPlan(create_read_items_for_chunk_list(key, md, [ChunkStorageMetadata(offsets, block.shape)]))

        def resolve_tensor(self, item):
            return block[tuple(slice(o, o + n) for o, n in zip(item.dest_offsets, item.lengths))]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({key: block}, storage_reader=dcp.FileSystemReader(str(ckpt)), planner=Rows(), no_dist=True)
    return block


# ----------------------------------------------------------------------------- the command


def _out_dtype(name: str | None, saved: torch.dtype) -> torch.dtype:
    if name is None:
        return saved
    if name not in DTYPE_NAMES:
        raise InteropError(f"export --dtype {name}: use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = str(text).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit) and t[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise InteropError(f"export --max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1000000")


def _staging(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InteropError(f"export --out {out} exists and is not empty; pick another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def export(run_dir: str | Path, out: str | Path, fmt: str = "hf", *, step: int | None = None,
           replica: int | None = None, dtype: str | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD,
           overwrite: bool = False) -> ExportResult:
    t0 = time.perf_counter()
    if fmt not in ("hf", "torch"):
        raise InteropError(f"export --format {fmt!r}: use 'hf' or 'torch'")
    run_dir, out = Path(run_dir), Path(out)
    ckpt = find_checkpoint(run_dir, step)
    try:
        verify(ckpt)
    except CheckpointError as e:
        raise InteropError(f"export: {e}; export an earlier checkpoint with --step") from None
    meta = _metadata(ckpt)
    prefix = choose_source(meta.keys(), replica)
    mds = {k[len(prefix):]: md for k, md in meta.items() if k.startswith(prefix)}
    cfg, args, names = run_args(run_dir, {n: tuple(md.size) for n, md in mds.items()})
    max_bytes = _parse_size(max_shard_size)
    tmp = _staging(out, overwrite)
    try:
        if fmt == "hf":
            files, n, nbytes = _write_hf(tmp, ckpt, prefix, mds, names, cfg, args, dtype, max_bytes)
        else:
            files, n, nbytes = _write_torch(tmp, ckpt, prefix, mds, names, dtype)
            shutil.copyfile(run_dir / "config.toml", tmp / "config.toml")
            files.append("config.toml")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, ckpt, prefix[:-1], tuple(files), n, nbytes, time.perf_counter() - t0)


def _eos_id(cfg) -> int | None:
    try:
        from dist_train.data import load_tokenizer

        return int(load_tokenizer(cfg.data.tokenizer).eos_id)
    except Exception:  # the tokenizer file may be gone; config.json does without
        return None


def _write_hf(tmp: Path, ckpt: Path, prefix: str, mds, names, cfg, args, dtype, max_bytes):
    saved = mds[names[0]].properties.dtype
    out_dtype = _out_dtype(dtype, saved)
    make = mixtral_config if args.moe_experts else llama_config
    config = make(args, dtype=HF_DTYPE.get(out_dtype, "float32"), max_seq_len=cfg.data.seq_len, eos_id=_eos_id(cfg))
    entries, targets = [], {}
    for name in names:
        shape = tuple(mds[name].size)
        targets[name] = to_hf(name, args.moe_experts)
        for hf, e in targets[name]:
            entries.append(Entry(hf, out_dtype, shape if e is None else shape[1:]))
    writer = ShardedWriter(tmp, entries, max_bytes)
    for name in names:
        md = mds[name]
        for row0, rows in row_blocks(md):
            block = read_rows(ckpt, prefix + name, md, row0, rows).to(out_dtype)
            for hf, e in targets[name]:
                if e is None:
                    writer.write(hf, block)
                elif row0 <= e < row0 + rows:  # stacked experts: row e is expert e's tensor
                    writer.write(hf, block[e - row0])
            del block
    files = [p.name for p in writer.close()]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    extra = ["model.safetensors.index.json"] if len(files) > 1 else []
    return ["config.json", *files, *extra], len(entries), sum(e.nbytes for e in entries)


def _write_torch(tmp: Path, ckpt: Path, prefix: str, mds, names, dtype):
    """model.pt: the skeleton is saved without data (torch.serialization.skip_data: every
    storage gets its place in the file, empty), then each block's bytes are written at its
    storage's offset. The tensors handed to the skeleton are never touched (torch.empty),
    so they take address space, not memory."""
    path = tmp / "model.pt"
    saved = {n: mds[n].properties.dtype for n in names}
    dtypes = {n: _out_dtype(dtype, saved[n]) for n in names}
    skeleton = {n: torch.empty(tuple(mds[n].size), dtype=dtypes[n]) for n in names}
    with torch.serialization.skip_data():
        torch.save(skeleton, path)
    offsets = _storage_offsets(path, [skeleton[n] for n in names])
    del skeleton
    total = 0
    with open(path, "r+b") as f:
        for name, offset in zip(names, offsets):
            md = mds[name]
            row_bytes = _nbytes(tuple(md.size)[1:], dtypes[name])
            for row0, rows in row_blocks(md):
                block = read_rows(ckpt, prefix + name, md, row0, rows).to(dtypes[name]).contiguous()
                f.seek(offset + row0 * row_bytes)
                f.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()))
                total += block.numel() * block.element_size()
                del block
        f.flush()
        os.fsync(f.fileno())
    return ["model.pt"], len(names), total


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _storage_offsets(path: Path, tensors: list[torch.Tensor]) -> list[int]:
    """Where each tensor's bytes start in a torch.save zip file. torch numbers storages
    in the order it pickles them (here: the dict's order, one storage per tensor) and
    stores each record uncompressed as `<archive>/data/<n>`; the data starts after the
    record's local header (30 bytes, its name and its extra field)."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        records = {Path(i.filename).name: i for i in z.infolist() if Path(i.filename).parent.name == "data"}
        offsets = []
        for n, t in enumerate(tensors):
            info = records.get(str(n))
            want = t.numel() * t.element_size()
            if info is None or info.file_size != want or info.compress_type != zipfile.ZIP_STORED:
                raise AssertionError(f"{path}: storage record {n} is not the {want}-byte record expected")
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            offsets.append(info.header_offset + 30 + name_len + extra_len)
    return offsets


def export_command(args) -> None:
    """The CLI's `export`."""
    if args.dtype is not None and args.dtype not in DTYPE_NAMES:
        raise InteropError(f"export --dtype {args.dtype}: use one of {', '.join(DTYPE_NAMES)}")
    result = export(args.run_dir, args.out, args.format, step=args.step, replica=args.replica, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(result.summary())

