"""Megatron-LM's indexed dataset: `PREFIX.bin` (the tokens) + `PREFIX.idx` (where they are).

`data.source = "megatron:PREFIX"` trains on a pair as Megatron's `preprocess_data.py`
writes it, memory-mapped, with the same resumable sampler as our own shards: the stream
is the .bin's tokens in order (documents follow each other, as Megatron's GPT dataset
concatenates them), cut into samples of seq_len + 1. `dist-train prepare ... --format
megatron --out PREFIX` writes a pair byte for byte as megatron-core's
`IndexedDatasetBuilder` does for the same documents (tests check both directions against
megatron-core 0.16.1).

The .idx layout (little-endian):

| bytes        | what                                                                           |
|--------------|--------------------------------------------------------------------------------|
| 9            | magic `MMIDIDX\\x00\\x00`                                                      |
| 8 (`<Q`)     | version, 1                                                                     |
| 1 (`<B`)     | token dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16 |
| 8 (`<Q`)     | S, the number of sequences                                                     |
| 8 (`<Q`)     | D, the number of document indices (documents + 1)                              |
| 4 S          | int32 sequence lengths (tokens)                                                |
| 8 S          | int64 sequence pointers (byte offsets into the .bin)                           |
| 8 D          | int64 document indices: document d is sequences [idx[d], idx[d + 1])           |
| (S)          | int8 sequence modes, only in multimodal datasets (refused here)                |

Megatron picks the dtype from the vocabulary: uint16 below 65500 ids, else int32. The
.idx does not record the vocabulary, so the reader takes it from `data.tokenizer`; an id
outside it (or negative) is an error naming the .bin and the position. A pair whose sizes
disagree (a truncated .bin, an .idx from another prefix) is refused when opened, naming
the file; nothing is read past what the .idx promises.
"""
from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

SOURCE_PREFIX = "megatron:"
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = len(MAGIC) + 8 + 1 + 8 + 8
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
         8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in CODES.items()}
FIX = "rebuild the pair (Megatron's preprocess_data.py, or `dist-train prepare ... --format megatron`)"
CHECK_CHUNK = 1 << 24  # tokens (or sequences) checked at a time


def megatron_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule (`DType.optimal_dtype`): uint16 below a vocabulary of 65500, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def paths(prefix: str | Path) -> tuple[Path, Path]:
    p = str(Path(prefix).expanduser())
    return Path(p + ".bin"), Path(p + ".idx")


def parse_source(source: str) -> Path:
    """`megatron:PREFIX` -> PREFIX (absolute)."""
    prefix = str(source)[len(SOURCE_PREFIX):]
    if not prefix:
        raise DataError(f"data.source = {source!r}: expected megatron:PATH_PREFIX (PATH_PREFIX.bin and "
                        "PATH_PREFIX.idx)")
    return Path(prefix).expanduser().resolve()


@dataclass
class MegatronIndex:
    path: Path
    dtype: np.dtype
    lengths: np.ndarray      # int32 [S]
    pointers: np.ndarray     # int64 [S]
    documents: np.ndarray    # int64 [D]

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def read_idx(idx: Path) -> MegatronIndex:
    """Parse and check an .idx (memory-mapped arrays); one line naming the file if it is
    not a complete, consistent Megatron index."""
    if not idx.is_file():
        raise DataError(f"{idx} does not exist; a Megatron dataset is PREFIX.bin + PREFIX.idx (data.source = "
                        "'megatron:PREFIX', without the extension)")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(HEADER)
    if len(head) < HEADER:
        raise DataError(f"{idx} is truncated ({size} bytes, shorter than the {HEADER}-byte header); {FIX}")
    if head[:len(MAGIC)] != MAGIC:
        raise DataError(f"{idx} is not a Megatron index (it does not start with {MAGIC!r}); {FIX}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(MAGIC):])
    if version != VERSION:
        raise DataError(f"{idx} has index version {version}; dist-train reads version {VERSION}; {FIX}")
    if code not in CODES:
        raise DataError(f"{idx}: dtype code {code} is not one of Megatron's ({sorted(CODES)}); {FIX}")
    dtype = np.dtype(CODES[code])
    if dtype.kind == "f":
        raise DataError(f"{idx} holds {dtype} values, not token ids; train on a token dataset")
    want = HEADER + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if size == want + n_seq and n_seq:
        raise DataError(f"{idx} holds sequence modes (a multimodal Megatron dataset); dist-train reads text "
                        "token datasets")
    if size != want:
        raise DataError(f"{idx} holds {size} bytes, but its header promises {want} ({n_seq} sequences, {n_doc} "
                        f"document indices): truncated or damaged; {FIX}")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER, shape=(n_seq,)) if n_seq else np.zeros(0, np.int32)
    pointers = (np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER + 4 * n_seq, shape=(n_seq,))
                if n_seq else np.zeros(0, np.int64))
    documents = (np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER + 12 * n_seq, shape=(n_doc,))
                 if n_doc else np.zeros(0, np.int64))
    _check_arrays(idx, dtype, lengths, pointers, documents)
    return MegatronIndex(idx, dtype, lengths, pointers, documents)


def _check_arrays(idx: Path, dtype: np.dtype, lengths, pointers, documents) -> None:
    """Lengths non-negative, pointers the running byte offsets (sequences follow each
    other in the .bin, as Megatron's builder writes them), documents a non-decreasing
    cover of the sequences from 0 to S. Checked in chunks: constant memory."""
    n = len(lengths)
    if len(documents) == 0 or documents[0] != 0 or documents[-1] != n:
        raise DataError(f"{idx}: its document indices must run from 0 to the {n} sequences, got "
                        f"{documents[:1].tolist()}..{documents[-1:].tolist()}; {FIX}")
    pos = 0
    for a in range(0, n, CHECK_CHUNK):
        ln = np.asarray(lengths[a:a + CHECK_CHUNK], dtype=np.int64)
        if len(ln) and int(ln.min()) < 0:
            raise DataError(f"{idx}: sequence {a + int(np.argmin(ln))} has a negative length; {FIX}")
        expect = pos + np.concatenate(([0], np.cumsum(ln[:-1]))) * dtype.itemsize
        got = np.asarray(pointers[a:a + CHECK_CHUNK])
        if not np.array_equal(got, expect):
            bad = a + int(np.argmax(got != expect))
            raise DataError(f"{idx}: sequence {bad} starts at byte {int(pointers[bad])}, not right after the "
                            f"sequence before it; dist-train reads .bin files whose sequences follow each other "
                            f"(as Megatron's builder writes them); {FIX}")
        pos = int(expect[-1] + ln[-1] * dtype.itemsize) if len(ln) else pos
    for a in range(0, len(documents) - 1, CHECK_CHUNK):
        d = np.asarray(documents[a:a + CHECK_CHUNK + 1])
        if len(d) > 1 and bool((np.diff(d) < 0).any()):
            raise DataError(f"{idx}: document indices decrease at document {a + int(np.argmax(np.diff(d) < 0))}; {FIX}")


class MegatronTokens:
    """A Megatron pair as one read-only token stream (TokenShards' interface: `read`,
    `total_tokens`, `vocab_size`, `eos_id`, `paths`, `verify`), plus its documents."""

    def __init__(self, prefix: str | Path, vocab_size: int, eos_id: int = -1):
        self.bin, self.idx = paths(prefix)
        self.prefix = Path(str(self.bin)[:-4])
        self.dir = self.prefix
        self.index = read_idx(self.idx)
        if not self.bin.is_file():
            raise DataError(f"{self.bin} does not exist (its index {self.idx} does); {FIX}")
        want = self.index.total_tokens * self.index.dtype.itemsize
        have = self.bin.stat().st_size
        if have != want:
            raise DataError(f"{self.bin} holds {have} bytes, but {self.idx.name} lists {self.index.total_tokens} "
                            f"{self.index.dtype} tokens ({want} bytes): the pair does not match (truncated, or "
                            f"from another prefix); {FIX}")
        self.tokens = (np.memmap(self.bin, dtype=self.index.dtype, mode="r") if want
                       else np.zeros(0, self.index.dtype))
        self.vocab_size = int(vocab_size)
        self.eos_id = int(eos_id)
        self.paths = [self.bin]

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        """Documents."""
        return len(self.index.documents) - 1

    def _seq_start(self, j: int) -> int:
        if j >= len(self.index.lengths):
            return self.total_tokens
        return int(self.index.pointers[j]) // self.index.dtype.itemsize

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens (all its sequences), a read-only view."""
        docs = self.index.documents
        return self.tokens[self._seq_start(int(docs[d])):self._seq_start(int(docs[d + 1]))]

    def _check_range(self, piece: np.ndarray, at: int) -> None:
        if not len(piece):
            return
        bad = (piece >= self.vocab_size) | (piece < 0) if piece.dtype.kind == "i" else piece >= self.vocab_size
        if bool(bad.any()):
            i = int(np.argmax(bad))
            raise DataError(f"{self.bin}: token id {int(piece[i])} at position {at + i} is outside the vocabulary "
                            f"of data.tokenizer ({self.vocab_size} ids); set data.tokenizer to the tokenizer the "
                            "dataset was made with")

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, stop) as int64, range-checked against the vocabulary."""
        if start < 0 or stop > self.total_tokens or stop < start:
            raise IndexError(f"token range [{start}, {stop}) outside 0..{self.total_tokens}")
        piece = self.tokens[start:stop]
        self._check_range(piece, start)
        if out is None:
            out = np.empty(stop - start, dtype=np.int64)
        out[:] = piece
        return out

    def verify(self, k: int = 0) -> None:
        """Every token id in range (the background check; the sizes were checked at open)."""
        for a in range(0, self.total_tokens, CHECK_CHUNK):
            self._check_range(np.asarray(self.tokens[a:a + CHECK_CHUNK]), a)


class MegatronWriter:
    """Writes PREFIX.bin + PREFIX.idx as megatron-core's IndexedDatasetBuilder would for
    the same documents (one sequence per document, as preprocess_data.py without
    --split-sentences): tokens stream to a temporary .bin, the index is written at
    `close`, then both are renamed into place (.bin first)."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.bin, self.idx = paths(prefix)
        self.bin.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = megatron_dtype(vocab_size)
        self.vocab_size = vocab_size
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._bin_tmp, self._idx_tmp = Path(str(self.bin) + tag), Path(str(self.idx) + tag)
        self._f = open(self._bin_tmp, "wb")
        self.lengths: list[int] = []
        self.doc_index: list[int] = [0]
        self.tokens = 0

    @property
    def documents(self) -> int:
        return len(self.doc_index) - 1

    def add_document(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise DataError(f"token id {int(ids.max())} is outside the tokenizer's vocabulary of {self.vocab_size}; "
                            "check the tokenizer file")
        if ids.size:  # an empty document is a boundary without a sequence, as in Megatron
            self._f.write(ids.astype(self.dtype, copy=False).tobytes())
            self.lengths.append(int(ids.size))
            self.tokens += int(ids.size)
        self.doc_index.append(len(self.lengths))

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF[self.dtype], len(lengths), len(self.doc_index)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.asarray(self.doc_index, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self.bin)
        os.replace(self._idx_tmp, self.idx)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        for p in (self._bin_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)
