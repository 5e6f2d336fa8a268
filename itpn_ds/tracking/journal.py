"""The on-disk buffer between the training loop and the tracking server.

Every tracking call appends one JSON record (one line) to ``journal.jsonl`` and returns: the training loop
never waits on the network. A sender reads the records after ``journal.cursor`` (a byte offset, replaced
atomically), sends them in order, and advances the cursor only once the server has them. A crash, a
preemption or a server outage therefore loses nothing: the unsent tail is sent by the next process that
opens the same directory (a requeued job, or ``python -m itpn_ds.tracking.sync``). Re-sending a record the
server already has is harmless: each metric carries its own timestamp, and MLflow drops exact duplicates.

Records (``kind`` + fields):
  start     time, status         the run (re)starts: mark it RUNNING
  params    values               parameter name -> string value
  metrics   step, time, values   metric name -> float, at one step
  tags      values               tag name -> string value
  artifact  path, artifact_path  a file to upload (it must stay in place until sent)
  end       time, status         the run stops with this MLflow status
Records the server rejects as invalid are moved to ``rejected.jsonl`` with the server's message.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Entry:
    """One record and the byte offset just past it (the cursor value once it is sent)."""

    record: dict[str, Any]
    end_offset: int


class Journal:
    """Append-only JSON-lines records with a persistent send cursor, in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "journal.jsonl"
        self.cursor_path = self.directory / "journal.cursor"
        self.rejected_path = self.directory / "rejected.jsonl"
        self._writer = None

    # -- writing (the training loop's side) ---------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        """Append one record; flushed to the OS at once, so a crashed process does not lose it."""
        if self._writer is None:
            self._writer = open(self.path, "a", encoding="utf-8")
        self._writer.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._writer.flush()

    def sync_to_disk(self) -> None:
        """fsync the journal (at close and before a preemption exit)."""
        if self._writer is not None:
            os.fsync(self._writer.fileno())

    def close_writer(self) -> None:
        if self._writer is not None:
            self.sync_to_disk()
            self._writer.close()
            self._writer = None

    # -- reading (the sender's side) ----------------------------------------------------------------------
    def cursor(self) -> int:
        try:
            return int(self.cursor_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def advance(self, offset: int) -> None:
        """Mark everything before ``offset`` as sent (atomic replace: a crash leaves the old or new value)."""
        tmp = self.cursor_path.with_suffix(".cursor.tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.cursor_path)

    def pending(self, limit: int) -> list[Entry]:
        """Up to ``limit`` complete records after the cursor (a half-written last line is left for later)."""
        return list(self._entries_from(self.cursor(), limit))

    def pending_count(self) -> int:
        return sum(1 for _ in self._entries_from(self.cursor(), None))

    def history(self) -> Iterator[dict[str, Any]]:
        """Every complete record ever written, sent or not (the source of the curves)."""
        return (entry.record for entry in self._entries_from(0, None))

    def reject(self, record: dict[str, Any], reason: str) -> None:
        with open(self.rejected_path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"record": record, "error": reason}) + "\n")

    def _entries_from(self, offset: int, limit: int | None) -> Iterator[Entry]:
        if not self.path.exists():
            return
        count = 0
        with open(self.path, "rb") as source:
            source.seek(offset)
            for line in source:
                if not line.endswith(b"\n"):
                    return
                offset += len(line)
                if line.strip():
                    yield Entry(json.loads(line), offset)
                    count += 1
                    if limit is not None and count >= limit:
                        return
