"""Anticipated failures, and the one boundary every subcommand reports them through.

A ``UserError`` is a failure the user can fix (bad data, a wrong configuration, a missing or damaged
checkpoint, a full or read-only disk, a taken port); its message names the file or key and says what to
do. ``itpn-ds`` prints it as one line, ``itpn-ds COMMAND: MESSAGE``, on stderr of every rank that met it
and exits with ``USER_ERROR_EXIT_CODE`` (2). Anything else is a bug and keeps its traceback.
``ITPN_DS_DEBUG=1`` (or ``itpn-ds --debug``) shows the traceback of user errors too.

File-system errors become user errors here (:func:`describe_os_error`), so modules need not wrap every
write: a full disk reads "no space left on the device", never a serializer's internal message.
"""
from __future__ import annotations

import errno
import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

USER_ERROR_EXIT_CODE = 2
DEBUG_ENV = "ITPN_DS_DEBUG"


class UserError(Exception):
    """A failure the user can fix; the message names the file or key and what to do."""


class DiskSpaceError(UserError, OSError):
    """Not enough free space for what a run is about to write."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot run: names the file or key and what is wrong."""


class FieldError(ConfigError):
    """A configuration dataclass's value out of its range, raised by the dataclass itself, which knows its field
    (``field``) but not the section it is configured under: ``itpn_ds.config.from_dict`` reports it under the
    dotted key (``detect.crop_size must be ...``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def import_for(module: str, what: str) -> Any:
    """``importlib.import_module(module)``; refused as a ConfigError naming the configuration ``what`` that
    needs it when it cannot be imported (an optional dependency missing)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{what} needs {module}, which cannot be imported: {exc}") from exc


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse ``value`` of the configuration key ``key`` unless it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def print_error_line(line: str) -> None:
    """Write ``line`` and its newline to stderr in one ``write``.

    Every rank of a torchrun or srun job writes into the same stderr pipe, and the launchers set
    ``PYTHONUNBUFFERED=1``: ``print`` would then issue the text and the newline as two system calls, and two
    ranks failing together could join their lines into one. A single write of under ``PIPE_BUF`` (4 KiB)
    bytes reaches the pipe whole.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space there or choose a directory on another disk",
    errno.EDQUOT: "disk quota exceeded: free space there or choose a directory on another disk",
    errno.EACCES: "permission denied: choose a directory you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted: choose a directory you can write to (or fix its permissions)",
    errno.EROFS: "read-only file system: choose a directory on a writable file system",
    errno.ENOTDIR: "a component of this path is a file, not a directory: choose another path",
    errno.EISDIR: "is a directory where a file is expected: name a file",
    errno.EEXIST: "already exists and is not a directory: choose another path",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EADDRINUSE: "address already in use: set MASTER_PORT to a free port (or unset it: single-process "
                      "runs pick a free one)",
}


def describe_os_error(exc: OSError) -> str | None:
    """One line for a file-system or socket error the user can act on, or None for any other."""
    advice = _OS_ADVICE.get(exc.errno or -1)
    if advice is None:
        return None
    where = exc.filename if exc.filename is not None else ""
    return f"{where}: {advice}" if where else advice


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an anticipated failure, or None when ``exc`` is a bug."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    return None


def require_free_space(directory: Path, needed_bytes: int, what: str) -> None:
    """Raise ``DiskSpaceError`` when the file system of ``directory`` (or its nearest existing parent)
    has fewer than ``needed_bytes`` free; ``what`` says what needs them."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise DiskSpaceError(f"{directory}: {free / 2**20:,.1f} MiB free, {what} needs about "
                             f"{needed_bytes / 2**20:,.1f} MiB: free space there or choose a directory on "
                             "another disk")


def require_writable_dir(directory: Path) -> None:
    """Raise ``UserError`` when ``directory`` cannot be created or written, without creating it."""
    directory = Path(directory)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{directory}: {probe} is a file, not a directory: choose another path")
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise UserError(f"{directory}: {probe} is on a read-only file system: choose a writable directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{directory}: {probe} is not writable: choose a directory you can write to")
