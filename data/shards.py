"""Token shards on disk and the `index.json` that lists them.

A shard is one flat column `tokens` (uint16 when the vocabulary fits, else uint32) in an
Arrow IPC file, read memory-mapped with no copy, so every rank can open the whole corpus
at no memory cost. Parquet shards with the same column are read too (memory-mapped, but
decoded). Files are written to `*.tmp`, fsynced and renamed, and the index is written
last, so a crash never leaves an index that lists a half-written shard.

What is checked when a directory is opened (cheap, so it runs on every rank at start):
the index's keys and types, each shard's existence, its size in bytes, the crc32 of its
last 64 KiB (where Arrow and Parquet keep their footers), its schema and token count.
`verify_shards` also checks the crc32 of every byte and the range of every token id;
readers check the id range of each sample they read (see `TokenShards.read`).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError

INDEX_NAME = "index.json"
FORMAT_NAME = "dist-train-tokens"
FORMAT_VERSION = 1
COLUMN = "tokens"
TAIL_BYTES = 64 * 1024
FORMATS = {"arrow": ".arrow", "parquet": ".parquet"}
FIX = "re-run `dist-train prepare` for this directory (or delete it so it is rebuilt)"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in index.json."""

    file: str
    format: str
    tokens: int
    bytes: int
    crc32: int
    tail_crc32: int


@dataclass(frozen=True)
class ShardIndex:
    """The contents of a shard directory's index.json."""

    tokenizer_spec: str
    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int
    dtype: str
    shards: tuple[ShardInfo, ...]
    documents: int = 0
    source: str = ""
    version: int = FORMAT_VERSION

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "tokenizer": {"spec": self.tokenizer_spec, "fingerprint": self.tokenizer_fingerprint},
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "dtype": self.dtype,
            "documents": self.documents,
            "total_tokens": self.total_tokens,
            "source": self.source,
            "shards": [asdict(s) for s in self.shards],
        }


# --- writing ---------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_and_checksum(path: Path) -> tuple[int, int, int]:
    """fsync a written file; return its (size, crc32, crc32 of the tail)."""
    crc = 0
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
        size = f.tell()
    return size, crc, _tail_crc32(path, size)


def _tail_crc32(path: Path, size: int) -> int:
    with open(path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        return zlib.crc32(f.read(TAIL_BYTES))


def write_shard(path: str | Path, tokens: np.ndarray, fmt: str = "arrow") -> ShardInfo:
    """Write one shard atomically (tmp, fsync, rename) and return its index entry.

    `tokens` must already have the shard dtype; ids are not range-checked here
    (`ShardWriter` does that).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown shard format {fmt!r}; use one of {sorted(FORMATS)}")
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
        raise DataError(f"{path}: shard tokens must be a 1-D uint16/uint32 array, "
                        f"got {tokens.dtype} with shape {tokens.shape}")
    tmp = path.with_name(path.name + ".tmp")
    column = pa.array(tokens)
    if fmt == "arrow":
        batch = pa.record_batch([column], names=[COLUMN])
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
    else:
        pq.write_table(pa.table({COLUMN: column}), str(tmp))
    size, crc, tail = _sync_and_checksum(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return ShardInfo(file=path.name, format=fmt, tokens=len(tokens), bytes=size,
                     crc32=crc, tail_crc32=tail)


def write_index(shard_dir: str | Path, index: ShardIndex) -> Path:
    """Write index.json atomically; call it after every shard is on disk."""
    shard_dir = Path(shard_dir)
    path = shard_dir / INDEX_NAME
    tmp = shard_dir / (INDEX_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index.to_json(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(shard_dir)
    return path


# --- reading the index -----------------------------------------------------------------

def _field(obj: dict, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing key {key!r}; {FIX}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: key {key!r} should be a {want}, got {value!r}; {FIX}")
    return value


def read_index(shard_dir: str | Path) -> ShardIndex:
    """Parse and validate `shard_dir/index.json`."""
    shard_dir = Path(shard_dir)
    path = shard_dir / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{shard_dir} has no {INDEX_NAME}, so it is not a prepared shard "
                        f"directory; create it with `dist-train prepare INPUT... --out {shard_dir}`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); {FIX}") from None
    where = str(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is not a dist-train token index (expected \"format\": "
                        f"\"{FORMAT_NAME}\"); {FIX}")
    version = _field(doc, "version", int, where)
    if version != FORMAT_VERSION:
        raise DataError(f"{path} has format version {version}, this dist-train reads version "
                        f"{FORMAT_VERSION}; {FIX}")
    tok = _field(doc, "tokenizer", dict, where)
    vocab_size = _field(doc, "vocab_size", int, where)
    dtype = _field(doc, "dtype", str, where)
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {dtype!r} should be \"uint16\" or \"uint32\"; {FIX}")
    if vocab_size <= 0 or np.dtype(dtype).itemsize < token_dtype(vocab_size).itemsize:
        raise DataError(f"{path}: dtype {dtype} cannot hold vocab_size {vocab_size}; {FIX}")
    shards = []
    for i, entry in enumerate(_field(doc, "shards", list, where)):
        w = f"{path} shards[{i}]"
        fmt = _field(entry, "format", str, w)
        if fmt not in FORMATS:
            raise DataError(f"{w}: format {fmt!r} should be one of {sorted(FORMATS)}; {FIX}")
        name = _field(entry, "file", str, w)
        if Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{w}: file {name!r} must be a plain file name inside {shard_dir}; {FIX}")
        shards.append(ShardInfo(
            file=name, format=fmt, tokens=_field(entry, "tokens", int, w),
            bytes=_field(entry, "bytes", int, w), crc32=_field(entry, "crc32", int, w),
            tail_crc32=_field(entry, "tail_crc32", int, w)))
    return ShardIndex(
        tokenizer_spec=_field(tok, "spec", str, where + " tokenizer"),
        tokenizer_fingerprint=_field(tok, "fingerprint", str, where + " tokenizer"),
        vocab_size=vocab_size, eos_id=_field(doc, "eos_id", int, where), dtype=dtype,
        shards=tuple(shards), documents=_field({"documents": 0, **doc}, "documents", int, where),
        source=str(doc.get("source", "")), version=version)


# --- reading shards --------------------------------------------------------------------

def read_shard(path: str | Path, info: ShardInfo, dtype: str) -> np.ndarray:
    """Open one shard and return its tokens as a read-only array.

    Arrow shards come back as a zero-copy view of the memory-mapped file (which stays
    mapped as long as the array lives); Parquet shards are decoded from a memory map.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} listed in {INDEX_NAME} is missing; {FIX}")
    size = path.stat().st_size
    if size != info.bytes:
        raise DataError(f"shard {path} is {size} bytes but {INDEX_NAME} says {info.bytes} "
                        f"(truncated or overwritten); {FIX}")
    if _tail_crc32(path, size) != info.tail_crc32:
        raise DataError(f"shard {path} fails its checksum (crc32 of the last {TAIL_BYTES} "
                        f"bytes differs from {INDEX_NAME}); {FIX}")
    try:
        if info.format == "arrow":
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            schema = reader.schema
            _check_schema(path, schema, dtype)
            batches = [reader.get_batch(i).column(COLUMN) for i in range(reader.num_record_batches)]
            column = pa.chunked_array(batches, type=schema.field(COLUMN).type)
        else:
            schema = pq.read_schema(str(path), memory_map=True)
            _check_schema(path, schema, dtype)
            column = pq.read_table(str(path), columns=[COLUMN], memory_map=True).column(COLUMN)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"shard {path} is not a readable {info.format} file ({e}); {FIX}") from None
    if column.null_count:
        raise DataError(f"shard {path}: column {COLUMN!r} has {column.null_count} nulls; {FIX}")
    if len(column) != info.tokens:
        raise DataError(f"shard {path} holds {len(column)} tokens but {INDEX_NAME} says "
                        f"{info.tokens}; {FIX}")
    if column.num_chunks == 1:
        arr = column.chunk(0).to_numpy(zero_copy_only=True)
    else:  # several batches or row groups: one contiguous copy
        arr = column.to_numpy()
    arr.flags.writeable = False
    return arr


def _check_schema(path: Path, schema: pa.Schema, dtype: str) -> None:
    if COLUMN not in schema.names:
        raise DataError(f"shard {path} has no column {COLUMN!r} (columns: {schema.names}); {FIX}")
    got = schema.field(COLUMN).type
    if str(got) != dtype:
        raise DataError(f"shard {path}: column {COLUMN!r} has type {got} but {INDEX_NAME} says "
                        f"{dtype}; {FIX}")


class TokenShards:
    """All shards of a directory as one read-only token stream."""

    def __init__(self, shard_dir: str | Path):
        self.dir = Path(shard_dir)
        self.index = read_index(self.dir)
        self.arrays = [read_shard(self.dir / s.file, s, self.index.dtype) for s in self.index.shards]
        self.paths = [self.dir / s.file for s in self.index.shards]
        # offsets[k] is the stream position of shard k's first token
        self.offsets = np.zeros(len(self.arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in self.arrays], out=self.offsets[1:])

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def vocab_size(self) -> int:
        return self.index.vocab_size

    @property
    def eos_id(self) -> int:
        return self.index.eos_id

    def verify(self, k: int) -> None:
        """The full check of shard k (`verify_shard`)."""
        verify_shard(self, k)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens `[start, stop)` of the stream as int64, across shard boundaries.

        Raises DataError naming the shard if an id is outside the vocabulary.
        """
        n = stop - start
        if start < 0 or stop > self.total_tokens or n < 0:
            raise IndexError(f"token range [{start}, {stop}) outside 0..{self.total_tokens}")
        if out is None:
            out = np.empty(n, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, filled = start, 0
        while filled < n:
            a = self.arrays[k]
            lo = pos - int(self.offsets[k])
            take = min(len(a) - lo, n - filled)
            piece = a[lo:lo + take]
            if take and int(piece.max()) >= self.vocab_size:
                bad = lo + int(np.argmax(piece >= self.vocab_size))
                raise DataError(f"shard {self.paths[k]}: token id {int(a[bad])} at position {bad} "
                                f"is >= vocab_size {self.vocab_size} from {INDEX_NAME}; {FIX}")
            out[filled:filled + take] = piece
            filled += take
            pos += take
            k += 1
        return out


def verify_shards(shard_dir: str | Path) -> ShardIndex:
    """Full check of a shard directory: every byte's crc32 and every token id's range."""
    shards = TokenShards(shard_dir)
    for k in range(len(shards.arrays)):
        verify_shard(shards, k)
    return shards.index


def verify_shard(shards: TokenShards, k: int) -> None:
    """Full check of shard k: its whole file's crc32 against the index (opening a shard
    checks only its size and the crc32 of its last 64 KiB), and every token id's range."""
    info, path, arr = shards.index.shards[k], shards.paths[k], shards.arrays[k]
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    if crc != info.crc32:
        raise DataError(f"shard {path} fails its checksum (crc32 of the file differs from "
                        f"{INDEX_NAME}); {FIX}")
    if len(arr) and int(arr.max()) >= shards.vocab_size:
        bad = int(np.argmax(arr >= shards.vocab_size))
        raise DataError(f"shard {path}: token id {int(arr[bad])} at position {bad} is >= "
                        f"vocab_size {shards.vocab_size} from {INDEX_NAME}; {FIX}")


class BackgroundVerifier:
    """Full checks of some shards (`verify_shard`) in a daemon thread, once, while training
    runs: a same-size overwrite in the middle of a shard passes the cheap checks made at
    open. `failure` holds the first DataError found (and `bad_shard` its shard index), for
    the trainer to stop on. zlib releases the GIL on large buffers, so the thread costs the
    training thread little (docs/benchmarks.md)."""

    def __init__(self, shards, which: list[int]):
        """`shards`: a TokenShards or MegatronTokens (anything with `verify(k)`)."""
        import threading

        self.shards, self.which = shards, list(which)
        self.failure: DataError | None = None
        self.bad_shard: int | None = None
        self.seconds: float | None = None  # once done: how long the checks took
        self._thread = threading.Thread(target=self._run, name="shard-verifier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        t0 = time.perf_counter()
        for k in self.which:
            try:
                self.shards.verify(k)
            except DataError as e:
                self.failure, self.bad_shard = e, k
                break
        self.seconds = time.perf_counter() - t0

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the checks; True when they are done."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
