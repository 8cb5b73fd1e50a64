"""Turns a stream of documents into fixed-size token shards plus their index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError
from .shards import FORMATS, ShardIndex, ShardInfo, token_dtype, write_index, write_shard
from .tokenizer import Tokenizer

DEFAULT_SHARD_TOKENS = 1 << 25  # 32 Mi tokens: 64 MiB per uint16 shard


class ShardWriter:
    """Buffer token ids into shards of `shard_tokens`; `close()` writes the index last.

    Each document is followed by the tokenizer's `eos_id`, so documents never run into
    each other in the token stream.
    """

    def __init__(self, out_dir: str | Path, tokenizer: Tokenizer,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, fmt: str = "arrow", source: str = ""):
        if shard_tokens <= 0:
            raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
        if fmt not in FORMATS:
            raise DataError(f"unknown shard format {fmt!r}; use one of {sorted(FORMATS)}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.source = source
        self.vocab_size = tokenizer.vocab_size
        self.dtype = token_dtype(self.vocab_size)
        self._buf = np.empty(shard_tokens, dtype=self.dtype)
        self._fill = 0
        self._eos = np.array([tokenizer.eos_id], dtype=self.dtype)
        self.shards: list[ShardInfo] = []
        self.documents = 0
        self.tokens = 0

    def add_document(self, text: str) -> None:
        self.add_tokens(self.tokenizer.encode_array(text))
        self.add_tokens(self._eos)
        self.documents += 1

    def add_tokens(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise DataError(f"{self.tokenizer!r} produced token id {int(ids.max())} outside its "
                            f"vocab_size {self.vocab_size}; check the tokenizer file")
        pos = 0
        while pos < ids.size:
            take = min(ids.size - pos, self._buf.size - self._fill)
            self._buf[self._fill:self._fill + take] = ids[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self._buf.size:
                self._flush()
        self.tokens += int(ids.size)

    def _flush(self) -> None:
        if not self._fill:
            return
        name = f"shard-{len(self.shards):05d}{FORMATS[self.fmt]}"
        self.shards.append(write_shard(self.dir / name, self._buf[:self._fill], self.fmt))
        self._fill = 0

    def close(self) -> ShardIndex:
        """Write the last partial shard, then index.json; return the index."""
        self._flush()
        index = ShardIndex(
            tokenizer_spec=self.tokenizer.spec, tokenizer_fingerprint=self.tokenizer.fingerprint,
            vocab_size=self.vocab_size, eos_id=int(self.tokenizer.eos_id), dtype=self.dtype.name,
            shards=tuple(self.shards), documents=self.documents, source=self.source)
        write_index(self.dir, index)
        return index
