"""One rank reads, every rank receives: start-up work that each rank would otherwise repeat.

Fine-tuning from a ZeRO pre-training run consolidates its fp32 weights from every optimizer partition (about
4 GB of files for iTPN-L). Done on every rank that is 64 reads of the same files from the shared file system at
8 nodes x 8 GPUs; here rank 0 reads and loads, and the loaded model is broadcast tensor by tensor, so no rank
holds more than its own model and one staging tensor beyond what rank 0 read.

Outside a process group (one process) both helpers run locally.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
SOURCE_RANK = 0
PROC_IO = Path("/proc/self/io")


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def on_source_rank(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 and its (picklable) result on every rank. When ``fn`` raises on rank 0, every rank
    raises the same exception (so a bad checkpoint is one error line per rank, not a hang of the others)."""
    if not in_process_group():
        return fn()
    outcome: list = [None, None]  # [result, exception]
    if dist.get_rank() == SOURCE_RANK:
        try:
            outcome[0] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to every rank, re-raised below
            outcome[1] = exc
    dist.broadcast_object_list(outcome, src=SOURCE_RANK, device=comm_device())
    result, error = outcome
    if error is not None:
        raise error
    return result


def broadcast_module(module: nn.Module) -> int:
    """Overwrite, in place, every parameter and buffer of ``module`` on every rank with rank 0's, one tensor
    at a time (through the device on NCCL); -> bytes received per rank (0 outside a process group)."""
    if not in_process_group():
        return 0
    device, total = comm_device(), 0
    for tensor in module.state_dict().values():
        staged = tensor.to(device).contiguous()
        dist.broadcast(staged, src=SOURCE_RANK)
        if staged.data_ptr() != tensor.data_ptr():
            tensor.copy_(staged)
        total += tensor.numel() * tensor.element_size()
    return total


def comm_device() -> torch.device:
    """Where the process group's collectives take tensors: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bytes_read_by_process() -> int:
    """Bytes this process has read through read() calls so far (Linux ``/proc/self/io`` rchar: from disk or
    the page cache, the file system's own count); -1 where the kernel does not say."""
    try:
        for line in PROC_IO.read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


class ReadMeter:
    """Seconds and bytes read (``bytes_read_by_process``) between entering and leaving the ``with`` block."""

    def __enter__(self) -> "ReadMeter":
        self.start_s, self.start_bytes = time.perf_counter(), bytes_read_by_process()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start_s
        end = bytes_read_by_process()
        self.bytes = end - self.start_bytes if end >= 0 and self.start_bytes >= 0 else -1
