"""Fixed-length training samples cut from a token stream (shards, or a Megatron pair)."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DataError
from .sources import open_tokens


class TokenDataset:
    """The shards' concatenated tokens cut into non-overlapping samples of `seq_len + 1`.

    Sample `i` is tokens `[i*(seq_len+1), (i+1)*(seq_len+1))` of the stream; its input is
    the first `seq_len` tokens and its target the same window shifted by one. The tail
    that does not fill a sample is unused. Samples may span shard boundaries.
    """

    def __init__(self, shard_dir: str | Path, seq_len: int, tokenizer: str | None = None):
        """`shard_dir`: what `ensure_prepared` returned (a shard folder, or `megatron:PREFIX`,
        whose vocabulary is `tokenizer`'s: data/sources.py)."""
        try:
            n = operator.index(seq_len)
        except TypeError:
            n = 0
        if n <= 0:
            raise DataError(f"data.seq_len must be a positive integer, got {seq_len!r}")
        seq_len = n
        self.shards = open_tokens(shard_dir, tokenizer)
        self.dir = self.shards.dir
        self.seq_len = seq_len
        self.sample_tokens = seq_len + 1
        self._len = self.shards.total_tokens // self.sample_tokens
        if self._len == 0:
            raise DataError(f"{self.dir} holds {self.shards.total_tokens} tokens, fewer than one "
                            f"sample of data.seq_len + 1 = {self.sample_tokens} tokens; lower "
                            f"data.seq_len or prepare more data")

    @property
    def vocab_size(self) -> int:
        return self.shards.vocab_size

    @property
    def eos_id(self) -> int:
        return self.shards.eos_id

    @property
    def total_tokens(self) -> int:
        return self.shards.total_tokens

    def __len__(self) -> int:
        return self._len

    def tokens(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """The `seq_len + 1` tokens of sample `i` as int64."""
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} samples")
        start = i * self.sample_tokens
        return self.shards.read(start, start + self.sample_tokens, out)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(self.tokens(i))
        return t[:-1], t[1:]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(inputs, targets)`, each int64 `[len(indices), seq_len]`, for sample indices."""
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        buf = np.empty((len(idx), self.sample_tokens), dtype=np.int64)
        for row, i in enumerate(idx):
            self.tokens(i, out=buf[row])
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def collate(dataset: TokenDataset, indices: Sequence[int] | torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn one micro-batch of sample indices into `(inputs, targets)` tensors."""
    return dataset.batch(indices)
