"""Every sample exactly once per epoch over 1, 2 and 3 ranks; equal step counts; world-size-free resume."""
from __future__ import annotations

import numpy as np
import pytest

from itpn_ds.data.sampler import DistributedOrder


def _epoch(num_samples, batch, world, epoch=0, offset=0, seed=0):
    per_rank = [list(DistributedOrder(num_samples, batch, r, world, seed)(epoch, offset)) for r in range(world)]
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("num_samples,batch", [(37, 4), (10, 3), (5, 8)])
def test_each_sample_exactly_once_and_equal_steps(world, num_samples, batch):
    per_rank = _epoch(num_samples, batch, world)
    assert len({len(steps) for steps in per_rank}) == 1  # every rank takes the same number of steps
    seen = np.concatenate([s.indices[s.valid] for steps in per_rank for s in steps])
    assert sorted(seen.tolist()) == list(range(num_samples))
    padding = sum(int((~s.valid).sum()) for steps in per_rank for s in steps)
    assert padding == len(per_rank[0]) * batch * world - num_samples


def test_order_depends_on_seed_and_epoch_only():
    order = DistributedOrder(50, 4, seed=1)
    assert np.array_equal(order.permutation(3), DistributedOrder(50, 7, 1, 2, seed=1).permutation(3))
    assert not np.array_equal(order.permutation(3), order.permutation(4))


@pytest.mark.parametrize("world_before,world_after", [(2, 2), (2, 3), (3, 1)])
def test_resume_mid_epoch_sees_exactly_the_rest(world_before, world_after):
    num_samples, batch = 41, 3
    first = [list(DistributedOrder(num_samples, batch, r, world_before, 5)(2))[:3] for r in range(world_before)]
    offset = first[0][-1].next_offset
    assert all(steps[-1].next_offset == offset for steps in first)
    seen = [s.indices[s.valid] for steps in first for s in steps]
    rest = _epoch(num_samples, batch, world_after, epoch=2, offset=offset, seed=5)
    seen += [s.indices[s.valid] for steps in rest for s in steps]
    assert sorted(np.concatenate(seen).tolist()) == list(range(num_samples))


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty dataset"):
        DistributedOrder(0, 4)
