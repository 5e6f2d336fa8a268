"""Checkpoints of a run directory: atomic publication, keep-last-k, auto-resume, resharding.

Layout under ``<run_dir>/checkpoints``::

    step_00000120/              one checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's engine state (any ZeRO stage)
        rank00000.pt ...        per rank: RNG states (python, numpy, torch CPU/CUDA), loader position
        meta.json               step, epoch, trainer counters, world size, ZeRO stage, precision, model, and the
                                class map trained (``classes``, ``category_ids``: ``itpn_ds.data.class_map``)
        files.json              size and CRC32 of every other file of the checkpoint (written last)
    latest                      the tag of the newest complete checkpoint (one line)
    .tmp-step_00000140/         a save in progress (never read; removed at the next start)

A save writes everything into ``.tmp-<tag>``, all ranks barrier, then rank 0 renames the directory to
``<tag>`` and replaces ``latest`` through a temporary file and ``os.replace``. A crash or SIGKILL at any
moment leaves ``latest`` pointing at the previous complete checkpoint. Old checkpoints beyond
``keep_last`` are deleted only after the new one is published.

Verification: ``latest()`` and ``read_checkpoint`` check every file against ``files.json`` (sizes, then
CRC32) before a checkpoint is used. A run resumes from the newest checkpoint that verifies, naming any newer
one it skipped (truncated by a full disk, damaged in a copy); reading a damaged one for export or
evaluation is a ``CheckpointError`` naming the file.

Resharding: a checkpoint records its world size and ZeRO stage. Loading it under another world size or
stage goes through DeepSpeed's universal checkpoint format (converted once, next to the checkpoint, as
``<tag>_universal``, atomically too): weights, fp32 master weights, optimizer moments and step are all
restored. The loader position is global (samples consumed by all ranks), so the resumed run reads exactly
the samples the epoch has not seen yet, whatever its world size; the RNG states are per rank and cannot be
mapped, so every rank is re-seeded from (seed, step, rank). DeepSpeed 0.19.8's universal loader takes a
ZeRO-3 run's state only from a ZeRO-3 checkpoint and vice versa, so crossing between ZeRO-3 and stages
0-2 is refused with a message (:func:`check_reshard`); stages 0, 1 and 2 interchange.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from itpn_ds.errors import DiskSpaceError, UserError

log = logging.getLogger("itpn_ds.engine")

LATEST = "latest"
TMP_PREFIX = ".tmp-"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
META = "meta.json"
FILES = "files.json"
CRC_CHUNK = 1 << 24
DISK_FULL_BYTES = 1 << 20  # a failed save with less than this free is taken for a full disk


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be found, read or used; the message names the path."""


@dataclass(frozen=True)
class CheckpointRef:
    """A published checkpoint: its directory, tag and metadata."""

    root: Path
    tag: str
    meta: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / self.tag


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Saves, publishes, prunes and finds the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ----------------------------------------------------------------------------------------- saving
    def save(self, engine: Any, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> CheckpointRef:
        """Collective: every rank calls it. Returns the published checkpoint."""
        tag = tag_for_step(step)
        tmp_tag = f"{TMP_PREFIX}{tag}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        _barrier()
        tmp_dir = self.root / tmp_tag
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
            torch.save({**rank_state, "rng": rng_state()}, tmp_dir / rank_file(self.rank))
        except (RuntimeError, OSError) as exc:
            raise_if_disk_full(exc, tmp_dir)
            raise
        full_meta = {**meta, "step": step, "tag": tag, "world_size": self.world_size}
        if self.rank == 0:
            _atomic_write_text(tmp_dir / META, json.dumps(full_meta, indent=2, sort_keys=True))
        _barrier()
        if self.rank == 0:
            _atomic_write_text(tmp_dir / FILES, json.dumps(file_records(tmp_dir), indent=1, sort_keys=True))
            final = self.root / tag
            if final.exists():  # a re-save of the same step after a rollback
                shutil.rmtree(final)
            os.replace(tmp_dir, final)
            _atomic_write_text(self.root / LATEST, tag + "\n")
            # said when published, before the last barrier: a rank lost there leaves this checkpoint complete
            log.info("checkpoint %s saved (step %d, %d ranks)", final, step, self.world_size)
            self._prune()
        _barrier()
        return CheckpointRef(self.root, tag, full_meta)

    def _prune(self) -> None:
        tags = self.published_tags()
        for tag in tags[:-self.keep_last]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
            shutil.rmtree(self.root / f"{tag}_universal", ignore_errors=True)

    def remove_incomplete(self) -> None:
        """Delete saves that never got published (rank 0, at start-up)."""
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        _barrier()

    # ---------------------------------------------------------------------------------------- finding
    def published_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))

    def latest(self) -> CheckpointRef | None:
        """The newest checkpoint that verifies, at or before the one ``latest`` names (any, when the one it
        names is not on disk: said in a warning); None when the run has none. A newer one that does not verify
        is skipped with a warning naming it and the reason; when none verifies, ``CheckpointError`` names them
        all."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        named = pointer.read_text().strip()
        published = self.published_tags()
        on_disk = named in published
        candidates = [tag for tag in reversed(published) if not on_disk or tag <= named] or [named]
        problems = []
        for tag in candidates:
            try:
                ref = read_checkpoint(self.root / tag)
            except CheckpointError as exc:
                problems.append(str(exc))
                if self.rank == 0:
                    log.warning("skipping checkpoint %s: %s", self.root / tag, exc)
                continue
            if not on_disk and self.rank == 0:
                log.warning("%s names %s, which is not on disk: using %s, the newest checkpoint that verifies",
                            pointer, named, ref.path)
            return ref
        raise CheckpointError(f"{self.root}: no checkpoint verifies ({'; '.join(problems)}); move the run "
                              "directory aside and start again, or restore a checkpoint from a copy")

    # ---------------------------------------------------------------------------------------- loading
    def load(self, engine: Any, ref: CheckpointRef, zero_stage: int) -> dict[str, Any]:
        """Load engine state; returns this rank's extra state: ``loader`` position, ``rng`` states and
        whatever else the trainer saved (``ema``). Resharded: rank 0's file, with ``rng`` None (re-seed).

        Universal loading must have been enabled in the DeepSpeed config (see :func:`needs_universal`).
        """
        resharded = needs_universal(ref, self.world_size, zero_stage)
        load_dir, tag = ref.root, ref.tag
        if resharded:
            check_reshard(ref, zero_stage)
            load_dir, tag = ensure_universal(ref, self.rank), f"{ref.tag}_universal"
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {load_dir / tag}")
        state_file = ref.path / rank_file(0 if resharded else self.rank)
        if not state_file.is_file():
            raise CheckpointError(f"{state_file} is missing: checkpoint {ref.path} is incomplete")
        state = torch.load(state_file, weights_only=False)
        return {**state, "rng": None} if resharded else state


def read_checkpoint(path: str | Path) -> CheckpointRef:
    """A checkpoint directory (``.../checkpoints/step_N``), a ``checkpoints`` directory or a run directory,
    its files verified."""
    path, meta = read_meta(path)
    verify_files(path)
    return CheckpointRef(path.parent, path.name, meta)


def read_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, its ``meta.json``) of what :func:`read_checkpoint` takes, without reading the
    weights: what a command checks before any work."""
    path = Path(path)
    if (path / "checkpoints" / LATEST).is_file():
        path = path / "checkpoints"
    if (path / LATEST).is_file():
        named = (path / LATEST).read_text().strip()
        if not (path / named).is_dir():
            raise CheckpointError(f"{path / LATEST} names {named}, which is not on disk: give one of the "
                                  "checkpoints/step_N directories there")
        path = path / named
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint of this engine: {META} is missing (give a run "
                              "directory, its checkpoints/ directory or a checkpoints/step_N directory)")
    try:
        return path, json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_file} is corrupt: {exc}") from exc


def raise_if_disk_full(exc: BaseException, tmp_dir: Path) -> None:
    """A failed save on a full disk becomes one ``DiskSpaceError`` naming the directory (torch's writer says
    only "unexpected pos"); the partial save stays under its temporary name and ``latest`` is untouched."""
    errno_full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    free = shutil.disk_usage(tmp_dir.parent if tmp_dir.parent.exists() else Path("/")).free
    if errno_full or free < DISK_FULL_BYTES:
        raise DiskSpaceError(f"{tmp_dir}: no space left on the device while saving a checkpoint ({free / 2**20:.1f} "
                             "MiB free); the previous checkpoint is intact and `latest` still names it: free space "
                             "there (or move the run) and start the same command again to resume") from exc


def file_records(directory: Path) -> dict[str, list[int]]:
    """{relative path: [bytes, CRC32]} of every file under ``directory`` except ``files.json``."""
    return {str(p.relative_to(directory)): [p.stat().st_size, crc32_file(p)]
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != FILES}


def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_files(path: Path) -> None:
    """``CheckpointError`` naming the first file of checkpoint ``path`` that is missing, of another size or
    of another CRC32 than ``files.json`` records (checkpoints written before files.json: not checked)."""
    records_file = path / FILES
    if not records_file.is_file():
        return
    try:
        records = json.loads(records_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{records_file} is corrupt: {exc}") from exc
    for name, (size, crc) in records.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: checkpoint {path} is incomplete")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {size} when saved (truncated or replaced)")
    for name, (size, crc) in records.items():
        if crc32_file(path / name) != crc:
            raise CheckpointError(f"{path / name}: CRC32 differs from when it was saved (damaged)")


def needs_universal(ref: CheckpointRef, world_size: int, zero_stage: int) -> bool:
    """Whether loading ``ref`` here needs DeepSpeed's universal format (world size or stage changed)."""
    return ref.meta["world_size"] != world_size or ref.meta["zero_stage"] != zero_stage


def check_reshard(ref: CheckpointRef, zero_stage: int) -> None:
    """Refuse a stage change DeepSpeed's universal loader cannot do (into or out of ZeRO-3)."""
    saved = ref.meta["zero_stage"]
    if (saved == 3) != (zero_stage == 3):
        raise CheckpointError(
            f"{ref.path} was written under ZeRO stage {saved} and this run uses stage {zero_stage}: DeepSpeed's "
            "universal checkpoints load a ZeRO-3 run only from ZeRO-3 state and stages 0-2 only from stages 0-2. "
            f"Resume with deepspeed.zero_stage={saved} (any world size), or start a new run initialised from "
            "these weights (finetune.init for fine-tuning)")


def ensure_universal(ref: CheckpointRef, rank: int) -> Path:
    """Convert ``ref`` to DeepSpeed's universal format once (rank 0; others wait); returns its parent."""
    out = ref.root / f"{ref.tag}_universal"
    if rank == 0 and not out.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = ref.root / f"{TMP_PREFIX}{ref.tag}_universal"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ds_to_universal(Namespace(input_folder=str(ref.path), output_folder=str(tmp), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True, no_strict=False))
        except Exception as exc:  # noqa: BLE001 - re-raised with the checkpoint named
            raise CheckpointError(f"cannot convert {ref.path} (world size {ref.meta['world_size']}, ZeRO stage "
                                  f"{ref.meta['zero_stage']}) to DeepSpeed's universal format: {exc}") from exc
        os.replace(tmp, out)
    _barrier()
    return ref.root
