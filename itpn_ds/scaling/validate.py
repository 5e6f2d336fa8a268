"""Measure the bytes autograd actually keeps for backward, to check the activation model against.

``saved_bytes`` runs a forward under ``torch.autograd.graph.saved_tensors_hooks`` and sums the unique
storages of every tensor packed for backward, leaving out the model's parameters and buffers (those are
model states, not activations). ``checkpointed`` wraps the chosen blocks in non-reentrant
``torch.utils.checkpoint`` for the measurement, so the policy's effect is measured rather than assumed.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from itpn_ds.scaling.activations import CheckpointPolicy


def saved_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages saved for backward while ``forward()`` runs, parameters excluded.

    The storages are held until the count is taken, so a freed storage's address cannot be reused and
    counted twice."""
    state_storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state_storages:
            storages[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    total = sum(storage.nbytes() for storage in storages.values())
    del output
    return total


@contextlib.contextmanager
def checkpointed(blocks: Sequence[nn.Module], policy: CheckpointPolicy) -> Iterator[None]:
    """Run the blocks that ``policy`` selects (by forward-order index) under activation checkpointing."""
    chosen = [block for index, block in enumerate(blocks) if policy.checkpoints(index)]
    for block in chosen:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in chosen:
            del block.forward
