"""Distributed epoch order: which samples each rank reads at each step, and the resumable position.

The order of an epoch is one global permutation drawn from (seed, epoch). A global step covers
``world_size x batch_size`` consecutive positions of it; rank r takes the r-th slice of ``batch_size``.
So every sample is read exactly once per epoch across all ranks, and every rank takes the same
number of steps, ``ceil(remaining / (world_size x batch_size))``.

Remainder: positions past the end of the epoch in the last step are PADDING: they repeat real samples
(so the pipeline decodes ordinary images) but carry ``valid=False``; losses and metrics ignore them.

The position (``offset``) counts the samples all ranks have consumed, independent of the world size:
a run resumed from it with another world size reads exactly the samples not yet seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from itpn_ds.data.views import key_hash


@dataclass(frozen=True)
class StepSlice:
    """One rank's samples for one step: global sample indices (B,), validity (B,) and the epoch
    position after the step (over all ranks)."""

    indices: np.ndarray
    valid: np.ndarray
    next_offset: int


@dataclass(frozen=True)
class DistributedOrder:
    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("empty dataset: no samples to iterate")
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad batch/rank/world: {self.batch_size}, {self.rank}, {self.world_size}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def permutation(self, epoch: int) -> np.ndarray:
        """The global order of an epoch: a permutation of 0..N-1 from (seed, epoch) only."""
        return np.random.default_rng(key_hash("order", self.seed, epoch)).permutation(self.num_samples)

    def steps(self, offset: int = 0) -> int:
        """Steps every rank takes from ``offset`` to the end of the epoch."""
        return math.ceil(max(self.num_samples - offset, 0) / self.global_batch)

    def __call__(self, epoch: int, offset: int = 0) -> Iterator[StepSlice]:
        """This rank's slices for the rest of ``epoch`` from the global position ``offset``."""
        if not 0 <= offset <= self.num_samples:
            raise ValueError(f"offset {offset} outside 0..{self.num_samples}")
        order = self.permutation(epoch)
        for step in range(self.steps(offset)):
            start = offset + step * self.global_batch + self.rank * self.batch_size
            positions = np.arange(start, start + self.batch_size)
            valid = positions < self.num_samples
            indices = order[positions % self.num_samples]
            next_offset = min(offset + (step + 1) * self.global_batch, self.num_samples)
            yield StepSlice(indices, valid, next_offset)
