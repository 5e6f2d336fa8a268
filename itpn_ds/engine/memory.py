"""What one rank holds of the model state, measured from the live tensors of a DeepSpeed engine.

``model_state_bytes`` walks the tensors, it does not apply a formula: the module's parameters as this
rank stores them (``local_weight``: under ZeRO-3 each parameter's local partition, ``ds_tensor``;
otherwise the full tensor), and the optimizer's state: the fp32 master weights DeepSpeed keeps (whole or this rank's
partition, ``MASTER_WEIGHT_ATTRS``), the tensors the inner torch optimizer updates and its moment buffers.
Storages are counted once, so a tensor that is both a parameter and an optimizer parameter (fp32
without ZeRO) is not counted twice.
This is what ZeRO partitions; activations and communication buckets are not included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

# Where DeepSpeed's optimizer wrappers keep the fp32 master weights: ZeRO-1/2, ZeRO-3, the bf16 optimizer
# (ZeRO-3 empties the inner optimizer's param groups between steps, so they are not found there).
MASTER_WEIGHT_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


@dataclass(frozen=True)
class StateBytes:
    """Bytes of this rank's parameters and optimizer state (master weights + moments)."""

    params: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer


def model_state_bytes(engine: Any) -> StateBytes:
    """Measure ``engine`` (a DeepSpeed engine, any ZeRO stage) on this rank."""
    seen: set[int] = set()
    params = _unique_bytes((local_weight(p) for p in engine.module.parameters()), seen)
    masters = (t for attr in MASTER_WEIGHT_ATTRS for t in getattr(engine.optimizer, attr, None) or ())
    optimizer = _unique_bytes(masters, seen) + _unique_bytes(_optimizer_tensors(_inner_optimizer(engine.optimizer)), seen)
    return StateBytes(params=params, optimizer=optimizer)


def local_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this rank stores for ``param``: its ZeRO-3 partition (``ds_tensor``), unless ZeRO-3 keeps
    the parameter whole on every rank (``ds_persist``) or there is no partitioning."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None or getattr(param, "ds_persist", False):
        return param.data
    return partition


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16 and fp16 optimizers keep it in ``optimizer``)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"cannot find the torch optimizer inside {type(optimizer).__name__}")
    return optimizer


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from (p.data for p in group["params"])
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _unique_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Sum of the storage sizes of ``tensors``, each storage counted once across calls sharing ``seen``."""
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
