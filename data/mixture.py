"""Data mixtures (`data.mix`): several sources drawn with fixed weights, deterministically,
resumably, and resharded over data-parallel ranks like `DistributedBatchSampler`.

Sample ids. Source i's samples are numbered offset_i + j (j < its sample count n_i), the
sources in `data.mix`'s order; `MixtureDataset.batch` reads any of them.

Which source each sample comes from. The samples of the whole run form one global sequence,
positions t = 0, 1, 2, ...; each step takes the next `global_batch` positions, split
contiguously over the dp ranks as without a mixture. Position t goes to the source with the
largest w_i (t + 1) - c_i(t) (weights normalised to sum 1; c_i(t): samples source i had
before t; ties to the source listed first). The bound on the realised mixture: write
e_i(t) = w_i t - c_i(t), which sum to 0 over the n sources. The chosen source has the largest
e_i + w_i of n numbers summing to 1, so at least 1/n, and after its sample e_i + w_i - 1 >
-1; a source not chosen only grows. So e_i > -1 always, and as they sum to 0, e_i < n - 1:
after any T samples source i has had c_i within (w_i T - n + 1, w_i T + 1). Two sources:
within one sample of its share, at every point of the run.

Which sample of that source. Source i's k-th sample is entry k mod n_i of a permutation of
its samples seeded by (seed, i, k // n_i): a new order each time a source is used up, so
within one pass over a source no sample repeats and none is skipped.

State: t and the counts c_i (the deficits are recomputed from them, never accumulated, so
every rank and every resume computes the same floats). It holds for any dp layout or
micro-batch size: a checkpoint of a dp = 2 run continues on dp = 4 with the same global
sequence.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .errors import DataError
from .sampler import BatchShape, check_batching

STATE_VERSION = 1


def source_permutation(num_samples: int, seed: int, source: int, epoch: int) -> np.ndarray:
    seq = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, 0x6D6978, int(source), int(epoch)])
    return np.random.Generator(np.random.PCG64(seq)).permutation(num_samples)


class MixtureDataset:
    """Several `TokenDataset`s (same tokenizer and seq_len) under one sample numbering."""

    def __init__(self, names: Sequence[str], datasets: Sequence):
        self.names, self.datasets = list(names), list(datasets)
        first = self.datasets[0]
        for name, d in zip(self.names, self.datasets):
            if d.vocab_size != first.vocab_size or d.eos_id != first.eos_id:
                raise DataError(f"data.mix: source {name!r} has vocabulary {d.vocab_size} and eos {d.eos_id}, "
                                f"{self.names[0]!r} has {first.vocab_size} and {first.eos_id}; every source of a "
                                "mix must be tokenised with data.tokenizer (prepare them with the same tokenizer)")
        self.sizes = [len(d) for d in self.datasets]
        self.offsets = np.cumsum([0] + self.sizes)
        self.seq_len = first.seq_len
        self.dir = ", ".join(str(d.dir) for d in self.datasets)
        self.shards = MixtureShards([d.shards for d in self.datasets])

    @property
    def vocab_size(self) -> int:
        return self.datasets[0].vocab_size

    @property
    def eos_id(self) -> int:
        return self.datasets[0].eos_id

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(source, sample within it) of global sample id i."""
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return s, int(i - self.offsets[s])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        buf = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(idx):
            s, j = self.locate(i)
            self.datasets[s].tokens(j, out=buf[row])
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class MixtureSampler(BatchShape):
    """One rank's micro-batches of global sample ids of a weighted mixture (module docstring)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], *, global_batch: int, micro_batch: int,
                 dp_size: int = 1, dp_rank: int = 0, seed: int = 0):
        if len(sizes) != len(weights) or not sizes:
            raise DataError("data.mix: one weight per source")
        total_w = float(sum(weights))
        if not all(w > 0 for w in weights) or not np.isfinite(total_w):
            raise DataError(f"data.mix: weights must be positive numbers, got {list(weights)}")
        check_batching(global_batch, micro_batch, dp_size, dp_rank)  # the plain sampler's checks
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.cumsum([0] + self.sizes)
        self.weights = [float(w) / total_w for w in weights]
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_size, self.dp_rank, self.seed = dp_size, dp_rank, int(seed)
        self.consumed_samples = 0
        self.counts = [0] * len(self.sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _choose(self, t: int, counts: list[int]) -> int:
        deficits = [w * (t + 1) - c for w, c in zip(self.weights, counts)]
        return int(np.argmax(deficits))  # the first of equal ones

    def _sample(self, source: int, k: int) -> int:
        n = self.sizes[source]
        epoch, j = divmod(k, n)
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            self._perms[key] = source_permutation(n, self.seed, source, epoch)
        return int(self.offsets[source] + self._perms[key][j])

    def peek_global_batch(self) -> tuple[torch.Tensor, list[int]]:
        """All ranks' global sample ids of the next step, in rank order, and the counts after it."""
        counts, out = list(self.counts), []
        for t in range(self.consumed_samples, self.consumed_samples + self.global_batch):
            s = self._choose(t, counts)
            out.append(self._sample(s, counts[s]))
            counts[s] += 1
        return torch.tensor(out, dtype=torch.int64), counts

    def next_step(self) -> list[torch.Tensor]:
        g, self.counts = self.peek_global_batch()
        self.consumed_samples += self.global_batch
        mine = g[self.dp_rank * self.local_batch:(self.dp_rank + 1) * self.local_batch]
        return list(mine.split(self.micro_batch))

    def seek(self, step: int) -> None:
        """Stand where `step` steps of this sequence leave it (replays the source choices)."""
        self.consumed_samples, self.counts = 0, [0] * len(self.sizes)
        counts = self.counts
        for t in range(step * self.global_batch):
            counts[self._choose(t, counts)] += 1
        self.consumed_samples = step * self.global_batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "mix", "consumed_samples": self.consumed_samples,
                "counts": list(self.counts), "sizes": list(self.sizes), "weights": list(self.weights),
                "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        where = "the checkpoint's sampler state was saved"
        if state.get("kind") != "mix":
            raise DataError(f"{where} by a run without data.mix; resume with that run's data.source or start a "
                            "fresh run")
        if int(state["version"]) != STATE_VERSION:
            raise DataError(f"{where} with mixture state version {state['version']}, this dist-train reads "
                            f"{STATE_VERSION}; start a fresh run")
        if int(state["global_batch"]) != self.global_batch:
            raise DataError(f"{where} for train.global_batch = {state['global_batch']}, this run has "
                            f"{self.global_batch}; resume with train.global_batch = {state['global_batch']}")
        if [int(n) for n in state["sizes"]] != self.sizes:
            raise DataError(f"{where} for sources of {state['sizes']} samples, this run's data.mix has "
                            f"{self.sizes}; resume with the same data.mix sources and data.seq_len")
        if [float(w) for w in state["weights"]] != self.weights:
            raise DataError(f"{where} with data.mix weights {state['weights']} (normalised), this run has "
                            f"{self.weights}; resume with the same weights or start a fresh run")
        if int(state["seed"]) != self.seed:
            raise DataError(f"{where} with seed {state['seed']} (run.seed), this run has {self.seed}")
        counts = [int(c) for c in state["counts"]]
        if sum(counts) != int(state["consumed_samples"]) or int(state["consumed_samples"]) % self.global_batch:
            raise DataError(f"{where} at sample {state['consumed_samples']} with counts {counts}, which do not add "
                            "up to a step boundary; the checkpoint is corrupt")
        self.consumed_samples, self.counts = int(state["consumed_samples"]), counts

    def source_counts(self) -> list[int]:
        """Samples each source has given so far (the whole run, all ranks)."""
        return list(self.counts)




def prepare_sources(data_cfg) -> list[tuple[str, str]]:
    """(name, resolved) of every source of the `[data]` section: data.mix's in order, or
    data.source alone; each prepared if needed (`ensure_prepared`). A mix source's error
    names it."""
    from .prepare import ensure_prepared

    d = data_cfg
    if not d.mix:
        return [(d.source, str(ensure_prepared(d.source, d.cache_dir or None, d.tokenizer, text_field=d.text_field)))]
    out = []
    for name in d.mix:
        try:
            out.append((name, str(ensure_prepared(name, d.cache_dir or None, d.tokenizer, text_field=d.text_field))))
        except DataError as e:
            raise DataError(f"data.mix[{name!r}]: {e}") from None
    return out


class MixtureShards:
    """The shards of every source as one list (`paths`, `verify(k)`), for the background
    verifier and the message naming a damaged file."""

    def __init__(self, shards: Sequence):
        self._shards = list(shards)
        self._where = [(s, k) for s in self._shards for k in range(len(s.paths))]
        self.paths = [p for s in self._shards for p in s.paths]

    def verify(self, k: int):
        s, j = self._where[k]
        return s.verify(j)


__all__ = ["MixtureDataset", "MixtureSampler", "MixtureShards", "prepare_sources", "source_permutation"]
