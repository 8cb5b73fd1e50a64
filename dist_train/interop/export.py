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

Streaming: no process group; each tensor is read in blocks of rows (at most BLOCK_BYTES),
none crossing a stored chunk's edge, straight from the chunks' bytes in the .distcp files
(`ChunkReader`; row chunks under FSDP or ep, column chunks under tp), and each block is
written at once to its place in the output. So exporting needs memory for one block (two
for column chunks), not the model (bench/export.py measures it). The checkpoint's
manifest is verified first (sizes and CRC32), and the output is built in a hidden sibling
folder and renamed into place, so a failed export leaves nothing half-written under --out.

Which parameters: a plain run's checkpoint holds them under `model.`; a DiLoCo run's under
`replica<r>.model.` (each replica's own, which drift apart between outer steps) and
`diloco.global.` (the outer parameters every replica agreed on at the last outer step).
Export takes `diloco.global.` by default, or replica R's with `--replica R`.
"""
from __future__ import annotations

import dataclasses
import functools
import io
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


BLOCK_BYTES = 64 * 2**20  # the most bytes one block read from a stored chunk holds


def row_blocks(md, max_bytes: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """(first row, rows) blocks of at most max_bytes each (at least one row), none of them
    crossing a stored chunk's first or last row, so every stored chunk holds all of a
    block's rows or none."""
    size = tuple(md.size)
    if not size:
        return [(0, 1)]
    step = max(1, max_bytes // _nbytes(size[1:], md.properties.dtype))
    cuts = sorted({0, size[0]} | {int(c.offsets[0]) for c in md.chunks}
                  | {int(c.offsets[0] + c.sizes[0]) for c in md.chunks})
    return [(r, min(step, b - r)) for a, b in zip(cuts, cuts[1:]) for r in range(a, b, step)]


@functools.cache
def _rows_planner():
    """A DCP load planner class reading rows [row0, row0 + rows) of one tensor into a
    block. It is made once (cached), not per call: a class made per call, closing
    over its block, lives in a reference cycle until the garbage collector runs, and so
    would its block."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RowsPlanner(DefaultLoadPlanner):
        def __init__(self, key: str, md, row0: int, block: torch.Tensor):
            super().__init__()
            self.key, self.md, self.row0, self.block = key, md, row0, block

        def create_local_plan(self):
            offsets = torch.Size([self.row0] + [0] * (self.block.dim() - 1))
            chunk = ChunkStorageMetadata(offsets, self.block.shape)
            return LoadPlan(create_read_items_for_chunk_list(self.key, self.md, [chunk]))

        def resolve_tensor(self, item):
            return self.block[tuple(slice(o, o + n) for o, n in zip(item.dest_offsets, item.lengths))]

    return RowsPlanner


class _FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a file of their own (one stored
    chunk of a .distcp file: a torch.save blob)."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = min(max(base + pos, 0), self._len)
        return self._pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got
        return got


class ChunkReader:
    """Blocks of rows of a DCP checkpoint's tensors, without a process group.

    DCP stores each chunk (an FSDP or expert shard: a block of rows; under tp also a block
    of columns) as a torch.save blob inside a .distcp file: a zip whose one storage record
    holds the chunk's bytes, uncompressed, row-major. So a block's rows are a contiguous
    byte range of every chunk holding them, read straight into the block (through a
    buffer of the chunk's width for a column chunk). The blob's pickle, loaded onto the
    meta device, reads no data and says the chunk is contiguous. A block costs its own
    bytes (twice for column chunks), whatever the size of the chunks. Only a blob DCP
    transformed (or one not laid out so) goes through `dcp.load` with a planner asking
    for the block's rows: the block plus one stored chunk at a time."""

    def __init__(self, ckpt: Path):
        import torch.distributed.checkpoint as dcp

        self.ckpt = Path(ckpt)
        meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
        self.tensors, self.storage = meta.state_dict_metadata, meta.storage_data
        self._records: dict[tuple[str, int], tuple[Path, int] | None] = {}

    def rows(self, key: str, row0: int, rows: int) -> torch.Tensor:
        """Rows [row0, row0 + rows) of checkpoint tensor `key` (a `row_blocks` block)."""
        md = self.tensors[key]
        size = tuple(md.size)
        if not size:
            raise AssertionError(f"{key}: a 0-d tensor is no model parameter")
        block = torch.empty((rows, *size[1:]), dtype=md.properties.dtype)
        pieces = []  # (chunk, its raw record) of every chunk holding these rows
        for i, c in enumerate(md.chunks):
            c0, cn = int(c.offsets[0]), int(c.sizes[0])
            if c0 < row0 + rows and row0 < c0 + cn and all(c.sizes):
                record = self._record(key, i)
                if record is None or not (c0 <= row0 and row0 + rows <= c0 + cn):
                    return self._via_dcp(key, md, row0, block)
                pieces.append((c, record))
        for c, (path, start) in pieces:
            offset = start + (row0 - int(c.offsets[0])) * _nbytes(tuple(c.sizes[1:]), block.dtype)
            if tuple(c.sizes[1:]) == size[1:]:
                _read_into(path, offset, block)  # the chunk has whole rows: read them in place
            else:  # a column block (tp): its rows are contiguous in the chunk, not in the block
                part = torch.empty((rows, *c.sizes[1:]), dtype=block.dtype)
                _read_into(path, offset, part)
                block[(slice(None), *(slice(o, o + n) for o, n in zip(c.offsets[1:], c.sizes[1:])))].copy_(part)
                del part
        return block

    def _record(self, key: str, i: int) -> tuple[Path, int] | None:
        """(file, byte offset) of the bytes of chunk i of `key`, when they are stored raw."""
        if (key, i) not in self._records:
            self._records[key, i] = self._find_record(key, self.tensors[key], self.tensors[key].chunks[i])
        return self._records[key, i]

    def _find_record(self, key: str, md, chunk) -> tuple[Path, int] | None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.storage.get(MetadataIndex(key, chunk.offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return None  # a transformed (e.g. compressed) blob: DCP's reader undoes the transform
        path = self.ckpt / info.relative_path
        with open(path, "rb") as f:
            blob = io.BufferedReader(_FileSlice(f, info.offset, info.length), 1 << 16)
            meta = torch.load(blob, map_location="meta", weights_only=True)
            if (not isinstance(meta, torch.Tensor) or tuple(meta.shape) != tuple(chunk.sizes)
                    or meta.dtype != md.properties.dtype or not meta.is_contiguous() or meta.storage_offset() != 0):
                return None
            records = _zip_records(blob)
        want = meta.numel() * meta.element_size()
        data = [(start, n) for name, (start, n) in records.items() if Path(name).parent.name == "data"]
        if len(data) != 1 or data[0][1] != want:
            return None
        return path, info.offset + data[0][0]

    def _via_dcp(self, key: str, md, row0: int, block: torch.Tensor) -> torch.Tensor:
        import warnings

        import torch.distributed.checkpoint as dcp

        planner = _rows_planner()(key, md, row0, block)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({key: block}, storage_reader=dcp.FileSystemReader(str(self.ckpt)), planner=planner,
                     no_dist=True)
        planner.block = planner.state_dict = planner.original_state_dict = None
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
    reader = ChunkReader(ckpt)
    meta = reader.tensors
    prefix = choose_source(meta.keys(), replica)
    mds = {k[len(prefix):]: md for k, md in meta.items() if k.startswith(prefix)}
    cfg, args, names = run_args(run_dir, {n: tuple(md.size) for n, md in mds.items()})
    max_bytes = _parse_size(max_shard_size)
    tmp = _staging(out, overwrite)
    try:
        if fmt == "hf":
            files, n, nbytes = _write_hf(tmp, reader, prefix, mds, names, cfg, args, dtype, max_bytes)
        else:
            files, n, nbytes = _write_torch(tmp, reader, prefix, mds, names, dtype)
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


def _write_hf(tmp: Path, reader: ChunkReader, prefix: str, mds, names, cfg, args, dtype, max_bytes):
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
            block = reader.rows(prefix + name, row0, rows).to(out_dtype)
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


def _write_torch(tmp: Path, reader: ChunkReader, prefix: str, mds, names, dtype):
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
                block = reader.rows(prefix + name, row0, rows).to(dtypes[name]).contiguous()
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


def _zip_records(f) -> dict[str, tuple[int, int]]:
    """{record name: (where its data starts, its size)} of the uncompressed records of a
    zip file (torch.save's format: every record is stored). The data starts after the
    record's local header: 30 bytes, its name and its extra field."""
    out = {}
    with zipfile.ZipFile(f) as z:
        infos = [i for i in z.infolist() if i.compress_type == zipfile.ZIP_STORED]
    for info in infos:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _read_into(path: Path, offset: int, block: torch.Tensor) -> None:
    """Fill `block` (contiguous) with the bytes of `path` from `offset` on."""
    view = memoryview(block.reshape(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise InteropError(f"export: {path} ends before the {len(view)} bytes at {offset}; "
                                   "the checkpoint is truncated")
            done += got


def _storage_offsets(path: Path, tensors: list[torch.Tensor]) -> list[int]:
    """Where each tensor's bytes start in a torch.save zip file. torch numbers storages
    in the order it pickles them (here: the dict's order, one storage per tensor) and
    stores each record uncompressed as `<archive>/data/<n>`."""
    with open(path, "rb") as f:
        records = {Path(name).name: r for name, r in _zip_records(f).items() if Path(name).parent.name == "data"}
    offsets = []
    for n, t in enumerate(tensors):
        start, size = records.get(str(n), (None, None))
        want = t.numel() * t.element_size()
        if size != want:
            raise AssertionError(f"{path}: storage record {n} is not the {want}-byte record expected")
        offsets.append(start)
    return offsets


def export_command(args) -> None:
    """The CLI's `export`."""
    if args.dtype is not None and args.dtype not in DTYPE_NAMES:
        raise InteropError(f"export --dtype {args.dtype}: use one of {', '.join(DTYPE_NAMES)}")
    result = export(args.run_dir, args.out, args.format, step=args.step, replica=args.replica, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(result.summary())

