"""Safetensors files written one piece of a tensor at a time.

`safetensors.torch.save_file` (and DCP's HuggingFaceStorageWriter, which saves a state
dict) takes every tensor of a file at once, so a 5 GB shard would need 5 GB of memory.
The format does not: an 8-byte little-endian header size, a JSON header giving each
tensor's dtype, shape and byte range in the data that follows, then the data. Every
shape is known from the checkpoint's metadata before any value is read, so the header is
written first and the bytes follow in the planned order, in pieces of any size.
The files are read back with the real `safetensors` library (tests, transformers).

`ShardedWriter` splits the tensors into files of at most `max_shard_bytes` (a tensor
larger than that gets a file of its own) named as save_pretrained names them
(`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InteropError

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class FileWriter:
    """One safetensors file; `write(name, piece)` appends the next bytes of tensor `name`,
    which must be the entry being filled (entries fill in the planned order)."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path, self.entries = Path(path), list(entries)
        header, offset = {}, 0
        for e in self.entries:
            header[e.name] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.total = offset
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._i, self._filled = 0, 0  # entry being filled, its bytes written so far

    def write(self, name: str, piece: torch.Tensor) -> None:
        while self._i < len(self.entries) and self.entries[self._i].nbytes == 0:
            self._i += 1  # empty tensors have no bytes
        e = self.entries[self._i] if self._i < len(self.entries) else None
        if e is None or e.name != name or piece.dtype != e.dtype:
            raise AssertionError(f"{self.path}: got {name} ({piece.dtype}), expected "
                                 f"{e.name + ' (' + str(e.dtype) + ')' if e else 'nothing more'}")
        data = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._filled + data.nbytes > e.nbytes:
            raise AssertionError(f"{self.path}: {name} got more than its {e.nbytes} bytes")
        self._f.write(memoryview(data))
        self._filled += data.nbytes
        if self._filled == e.nbytes:
            self._i, self._filled = self._i + 1, 0

    def close(self) -> None:
        while self._i < len(self.entries) and self.entries[self._i].nbytes == 0:
            self._i += 1
        if self._i != len(self.entries):
            raise AssertionError(f"{self.path}: {self.entries[self._i].name} was not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def plan_files(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive entries grouped into files of at most max_shard_bytes of data."""
    files: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if files[-1] and size + e.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += e.nbytes
    return files


class ShardedWriter:
    """A model's safetensors files in `folder`; tensors (or their pieces) arrive in the
    order of `entries`, and at most one file is open at a time."""

    def __init__(self, folder: Path, entries: list[Entry], max_shard_bytes: int):
        if len({e.name for e in entries}) != len(entries):
            raise InteropError("export: two tensors map to the same HF name")
        self.folder = Path(folder)
        self.groups = plan_files(entries, max_shard_bytes)
        n = len(self.groups)
        self.names = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.file_of = {e.name: i for i, g in enumerate(self.groups) for e in g}
        self._open: FileWriter | None = None
        self._k = -1

    def write(self, name: str, piece: torch.Tensor) -> None:
        k = self.file_of[name]
        if k != self._k:
            if self._open is not None:
                self._open.close()
            if k != self._k + 1:
                raise AssertionError(f"{name}: written out of order")
            self._k = k
            self._open = FileWriter(self.folder / self.names[k], self.groups[k], {"format": "pt"})
        self._open.write(name, piece)

    def close(self) -> list[Path]:
        while self._k < len(self.groups) - 1:  # files whose tensors are all empty
            self.write_empty_next()
        if self._open is not None:
            self._open.close()
            self._open = None
        if len(self.groups) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for g in self.groups for e in g)},
                     "weight_map": {e.name: self.names[i] for i, g in enumerate(self.groups) for e in g}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / n for n in self.names]

    def write_empty_next(self) -> None:
        if self._open is not None:
            self._open.close()
        self._k += 1
        self._open = FileWriter(self.folder / self.names[self._k], self.groups[self._k], {"format": "pt"})
