"""Which samples each data-parallel rank trains on, step by step, resumably.

Every optimizer step takes the next `global_batch` samples of a seeded permutation of the
dataset (a new permutation each epoch, from `(seed, epoch)`; the tail that does not fill
a global batch is dropped). That global batch is split contiguously over the `dp_size`
ranks and each rank's part into micro-batches. The position is kept in global samples,
so a run resumed with another data-parallel layout or micro-batch size continues with
exactly the same global sample sequence.
"""

from __future__ import annotations

from typing import Any, Iterator, Sized

import numpy as np
import torch

from .errors import DataError

STATE_VERSION = 1
DP_FIELDS = "parallel.dp_replicate x parallel.dp_shard"


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch; depends only on its arguments."""
    seq = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, int(epoch)])
    return np.random.Generator(np.random.PCG64(seq)).permutation(num_samples)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_batching(global_batch: int, micro_batch: int, dp_size: int, dp_rank: int) -> None:
    """The batch and data-parallel checks every sampler shares, each one line naming the fields."""
    if global_batch <= 0:
        raise DataError(f"train.global_batch must be positive, got {global_batch}")
    if micro_batch <= 0:
        raise DataError(f"train.micro_batch must be positive, got {micro_batch}")
    if dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise DataError(f"data-parallel rank {dp_rank} is not in 0..{dp_size - 1} "
                        f"(dp_size = {DP_FIELDS} = {dp_size})")
    if global_batch % dp_size:
        up = -(-global_batch // dp_size) * dp_size
        raise DataError(f"train.global_batch = {global_batch} is not divisible by the "
                        f"data-parallel size {dp_size} ({DP_FIELDS}); set train.global_batch "
                        f"to a multiple of {dp_size} (e.g. {up}) or change parallel.dp_*")
    local = global_batch // dp_size
    if local % micro_batch:
        raise DataError(f"each data-parallel rank gets train.global_batch / dp = "
                        f"{global_batch} / {dp_size} = {local} samples, which is not "
                        f"divisible by train.micro_batch = {micro_batch}; set "
                        f"train.micro_batch to a divisor of {local} ({_divisors(local)[:8]}) "
                        f"or train.global_batch to a multiple of {dp_size * micro_batch}")


class BatchShape:
    """What a sampler's batch fields give: a rank's share, its micro-batches, the step."""

    global_batch: int
    micro_batch: int
    dp_size: int
    consumed_samples: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def num_micro_batches(self) -> int:
        return self.local_batch // self.micro_batch

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (over all epochs)."""
        return self.consumed_samples // self.global_batch


class DistributedBatchSampler(BatchShape):
    """One rank's micro-batches of sample indices for each optimizer step."""

    def __init__(self, num_samples: int | Sized, *, global_batch: int, micro_batch: int,
                 dp_size: int = 1, dp_rank: int = 0, seed: int = 0):
        n = num_samples if isinstance(num_samples, int) else len(num_samples)
        check_batching(global_batch, micro_batch, dp_size, dp_rank)
        if n < global_batch:
            raise DataError(f"the dataset has {n} samples (of data.seq_len + 1 tokens), fewer "
                            f"than train.global_batch = {global_batch}; lower train.global_batch "
                            f"or data.seq_len, or prepare more data")
        self.num_samples = n
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.seed = int(seed)
        self.steps_per_epoch = n // global_batch
        self.epoch = 0
        self.samples_in_epoch = 0
        self.consumed_samples = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
            self._perm_epoch = self.epoch
        return self._perm

    def peek_global_batch(self) -> torch.Tensor:
        """All ranks' samples of the next step, in rank order, without advancing."""
        s = self.samples_in_epoch
        return torch.from_numpy(self._permutation()[s:s + self.global_batch].copy())

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches (LongTensors of sample indices) for the next step."""
        g = self.peek_global_batch()
        mine = g[self.dp_rank * self.local_batch:(self.dp_rank + 1) * self.local_batch]
        self.samples_in_epoch += self.global_batch
        self.consumed_samples += self.global_batch
        if self.samples_in_epoch >= self.steps_per_epoch * self.global_batch:
            self.epoch += 1
            self.samples_in_epoch = 0
        return list(mine.split(self.micro_batch))

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        while True:
            yield self.next_step()

    def seek(self, step: int) -> None:
        """Stand where `step` steps of this sampler's sequence would have left it (an elastic
        replica that healed to another replica's step continues its own sequence there)."""
        self.epoch, rest = divmod(step, self.steps_per_epoch)
        self.samples_in_epoch = rest * self.global_batch
        self.consumed_samples = step * self.global_batch

    def state_dict(self) -> dict[str, Any]:
        """The position in global terms; valid for any dp layout or micro-batch size."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; it must come from the same dataset, global batch and seed."""
        keys = ("version", "epoch", "samples_in_epoch", "consumed_samples", "seed",
                "num_samples", "global_batch")
        missing = [k for k in keys if k not in state]
        if missing:
            raise DataError(f"the checkpoint's sampler state lacks {missing}; it was not saved "
                            f"by this version of dist-train, start a fresh run")
        st = {k: int(state[k]) for k in keys}
        if st["version"] != STATE_VERSION:
            raise DataError(f"the checkpoint's sampler state has version {st['version']}, this "
                            f"dist-train reads {STATE_VERSION}; start a fresh run")
        where = "the checkpoint's sampler state was saved"
        if st["global_batch"] != self.global_batch:
            raise DataError(f"{where} for train.global_batch = {st['global_batch']}, this run has "
                            f"train.global_batch = {self.global_batch}; resume with "
                            f"train.global_batch = {st['global_batch']} or start a fresh run")
        if st["num_samples"] != self.num_samples:
            raise DataError(f"{where} for a dataset of {st['num_samples']} samples, this run's "
                            f"dataset has {self.num_samples} (data.source, data.seq_len or the "
                            f"shards differ); resume with the same data and data.seq_len or "
                            f"start a fresh run")
        if st["seed"] != self.seed:
            raise DataError(f"{where} with seed {st['seed']} (run.seed), this run has seed "
                            f"{self.seed}; resume with run.seed = {st['seed']} or start a fresh run")
        s = st["samples_in_epoch"]
        if s < 0 or s % self.global_batch or s >= self.steps_per_epoch * self.global_batch:
            raise DataError(f"{where} at sample {s} of epoch {st['epoch']}, which is not a step "
                            f"boundary of this dataset; the checkpoint is corrupt")
        self.epoch = st["epoch"]
        self.samples_in_epoch = s
        self.consumed_samples = st["consumed_samples"]
