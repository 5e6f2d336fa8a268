"""Send what a run directory's tracking journal still holds: ``python -m itpn_ds.tracking.sync RUN_DIR``.

For a run whose last attempt ended while the tracking server was down. It reattaches to the run stored
in the journal's directory (``--buffer-dir`` if tracking.buffer_dir was set) and sends every pending
record in order. Exit status 0 when the journal is drained, 1 when the store is still unreachable.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from itpn_ds.tracking.journal import Journal
from itpn_ds.tracking.sender import MLflowSender, RunRecord, StoreUnavailable


def sync(buffer_dir: Path, request_timeout_s: float = 10.0) -> int:
    """Drain the journal in ``buffer_dir``; returns the number of records sent."""
    journal = Journal(buffer_dir)
    record = RunRecord.load(journal.directory / "run.json")
    if record is None:
        raise FileNotFoundError(f"{journal.directory / 'run.json'} is missing: this run never reached its "
                                "tracking store, so there is no run to send to; start the run again with "
                                "the store up (its journal is replayed from the start)")
    sender = MLflowSender(record.tracking_uri, journal, experiment="", run_name="",
                          request_timeout_s=request_timeout_s)
    sender.attach()
    total = 0
    while sent := sender.send_pending():
        total += sent
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m itpn_ds.tracking.sync", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--buffer-dir", type=Path, default=None, help="default: RUN_DIR/tracking")
    args = parser.parse_args(argv)
    buffer_dir = args.buffer_dir or args.run_dir / "tracking"
    try:
        sent = sync(buffer_dir)
    except StoreUnavailable as exc:
        print(f"tracking store unreachable, nothing lost (still in {buffer_dir}): {exc}", file=sys.stderr)
        return 1
    print(f"sent {sent} records from {buffer_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
