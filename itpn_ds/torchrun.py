"""``python -m itpn_ds.torchrun [torchrun options] -m itpn_ds.cli COMMAND ...``: torchrun, reporting as itpn-ds.

torchrun's own entry point prints a ``ChildFailedError`` traceback whenever a worker exits non-zero, even
when every worker stopped on an anticipated failure that it already reported in one line (exit code 2,
``itpn_ds.errors``). This wrapper takes the same arguments and runs the same launcher
(``torch.distributed.run.run``); when the workers exited with 2 (and any others were stopped by torchrun's
SIGTERM after that) it adds nothing to their lines and exits 2 itself, and any other failure keeps torchrun's summary of it (exit 1, or the worker's code for a
preemption, ``PREEMPTED_EXIT_CODE``, which the SLURM wrapper requeues on).
"""
from __future__ import annotations

import signal
import sys

from itpn_ds.errors import USER_ERROR_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if USER_ERROR_EXIT_CODE in codes and codes <= {USER_ERROR_EXIT_CODE, -signal.SIGTERM}:
            return USER_ERROR_EXIT_CODE  # the rest were stopped by torchrun itself after the first one exited
        print(exc.format_msg(), file=sys.stderr, flush=True)
        return codes.pop() if len(codes) == 1 and min(codes) > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
