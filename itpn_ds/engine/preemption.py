"""Preemption: a signal asks the run to checkpoint at the next step boundary and exit for a requeue.

Contract (launch/slurm/lib.sh relies on it):

1. SIGUSR1 (SLURM's ``--signal=B:USR1@GRACE``, forwarded by the batch shell) or SIGTERM (scheduler
   preemption) only sets a flag in the handler; nothing else runs inside the handler.
2. At every optimizer-step boundary all ranks all-reduce (MAX) their flag, so they agree on the same step
   even when the signal reached them at different times.
3. They save a checkpoint (written under a temporary tag, then published atomically), barrier, close the
   tracker as KILLED and exit with :data:`PREEMPTED_EXIT_CODE`. The SLURM wrapper requeues on that code;
   the requeued job resumes from the run directory's latest checkpoint.
4. Further signals during the save set the flag that is already set: the save is never interrupted, and
   since a checkpoint becomes ``latest`` only after it is complete, even a SIGKILL mid-save leaves the last
   good checkpoint intact.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 85
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Installs the handlers; ``agreed()`` is the collective check at a step boundary."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self._event = threading.Event()
        self.received: list[str] = []
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        self._event.set()

    @property
    def local(self) -> bool:
        """This rank received a signal."""
        return self._event.is_set()

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank received a signal (a collective: call it on all ranks;
        ``device`` is where the backend reduces: the rank's GPU under NCCL, the CPU under gloo)."""
        flag = torch.tensor([1 if self.local else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
