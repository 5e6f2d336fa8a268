"""Searches over the plan grid: every row, the fastest fitting row per GPU count, the largest micro-batch."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from itpn_ds.scaling.activations import CheckpointPolicy
from itpn_ds.scaling.memory import GPU
from itpn_ds.scaling.plan import Assumptions, Config, Row, plan_row
from itpn_ds.scaling.spec import ModelSpec

MAX_MICRO_BATCH = 4096


@dataclass(frozen=True)
class Grid:
    """The configurations to plan: every combination whose micro-batch x GPUs divides the global batch."""

    gpus: Sequence[int]
    zero_stages: Sequence[int]
    checkpoints: Sequence[CheckpointPolicy]
    micro_batches: Sequence[int]
    global_batch: int
    online_teacher: bool

    def configs(self) -> Iterable[Config]:
        for gpus in self.gpus:
            for stage in self.zero_stages:
                for policy in self.checkpoints:
                    for micro in self.micro_batches:
                        if self.global_batch % (micro * gpus) == 0:
                            yield Config(gpus, stage, policy, micro, self.global_batch, self.online_teacher)

    def check(self) -> None:
        """Reject a GPU count below 1, or one at which no listed micro-batch divides the global batch."""
        for gpus in self.gpus:
            if gpus < 1:
                raise ValueError(f"GPU count must be >= 1, got {gpus}")
            if not any(self.global_batch % (micro * gpus) == 0 for micro in self.micro_batches):
                raise ValueError(
                    f"at {gpus} GPUs no micro-batch in {list(self.micro_batches)} divides the global batch "
                    f"{self.global_batch} (micro-batch x GPUs must divide it)"
                )


def all_rows(spec: ModelSpec, gpu: GPU, grid: Grid, assumptions: Assumptions) -> list[Row]:
    grid.check()
    return [plan_row(spec, gpu, config, assumptions) for config in grid.configs()]


def best_rows(rows: Sequence[Row]) -> list[Row]:
    """Per GPU count, the fitting row with the shortest step; ties go to fewer executed FLOPs (no needless
    recompute), then less communication, then the larger micro-batch (fewer, larger kernels), then the
    smaller footprint."""

    def rank(row: Row) -> tuple:
        return (round(row.step_s, 9), row.flops.executed, round(row.comm_s, 9), -row.config.micro_batch, row.total_bytes)

    best: dict[int, Row] = {}
    for row in rows:
        if row.fits and (row.config.gpus not in best or rank(row) < rank(best[row.config.gpus])):
            best[row.config.gpus] = row
    return [best[gpus] for gpus in sorted(best)]


def largest_micro_batch(spec: ModelSpec, gpu: GPU, config: Config, assumptions: Assumptions) -> Row | None:
    """The row with the largest micro-batch that fits for ``config``'s GPUs, stage and policy, ignoring the
    global batch (memory grows with the micro-batch, so a binary search); None when even 1 does not fit."""

    def row_for(micro: int) -> Row:
        unconstrained = replace(config, micro_batch=micro, global_batch=micro * config.gpus)
        return plan_row(spec, gpu, unconstrained, assumptions)

    if not row_for(1).fits:
        return None
    low, high = 1, MAX_MICRO_BATCH
    while low < high:
        middle = (low + high + 1) // 2
        if row_for(middle).fits:
            low = middle
        else:
            high = middle - 1
    return row_for(low)
