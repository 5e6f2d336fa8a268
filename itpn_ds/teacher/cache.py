"""``TeacherCache``: the memory-mapped teacher cache as the pre-training pipeline's ``ViewSource``.

Opening a cache maps every ``*.arrow`` file of the directory (``pa.memory_map`` + ``ipc.open_file``; the
targets stay on disk / in the page cache, nothing is copied), checks that all files agree (teacher, K,
seed, dtype, shapes), checks them against the run's expectation (shard sha256s, teacher identity) and
builds an in-memory index key -> (file, record batch, first row). A lookup is then a dict access plus a
slice of a memory-mapped buffer.

Per epoch a sample uses view ``view_for_epoch(seed, key, epoch, K)`` of its K cached views, with the seed
the cache was extracted with, and the pipeline decodes exactly the STORED box, flip and colour-jitter
factors. A cache of format version 1 (no jitter stored) is read as jitter-free views, with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from itpn_ds.data.color_jitter import NO_JITTER, JitterFactors
from itpn_ds.data.views import CropView, view_for_epoch
from itpn_ds.errors import UserError
from itpn_ds.teacher.cache_format import (JITTER_FIELDS, META_KEY, READABLE_VERSIONS, SUFFIX, CacheMeta,
                                          cache_file_name, column_names, row_crc32)

log = logging.getLogger(__name__)


class CacheError(UserError, RuntimeError):
    """A teacher cache that cannot serve this run: names the file or key and what is wrong."""


@dataclass(frozen=True)
class _Batch:
    """Zero-copy numpy views of one record batch: box (N, 4) int32, flip (N,) bool, jitter (N, 3) float32
    (None in format version 1), targets (N, T*D) fp16/int8, scales (N, T) float32 or None, crc32 (N,)
    uint32 (None before format version 3)."""

    box: np.ndarray
    flip: np.ndarray
    jitter: np.ndarray | None
    targets: np.ndarray
    scales: np.ndarray | None
    crc32: np.ndarray | None

    def check_row(self, row: int, where: str) -> None:
        """``CacheError`` when the row's stored values are not those written (format version 3 on)."""
        if self.crc32 is None:
            return
        scales = None if self.scales is None else self.scales[row]
        if row_crc32(self.box[row], bool(self.flip[row]), self.jitter[row], self.targets[row], scales) != self.crc32[row]:
            raise CacheError(f"{where}: CRC32 of the record differs from when it was written (damaged): delete the "
                             "file and re-run `itpn-ds extract-teacher` (finished files are kept)")


class TeacherCache:
    """Cached views and targets of a teacher cache directory.

    directory:        ``itpn-ds extract-teacher`` output (one ``.arrow`` file per shard).
    shards:           the run's shard directory: every shard must have its file, with the same sha256 and
                      sample count (None: skip this check).
    expected_teacher: fields of ``TeacherIdentity.as_dict()`` the run requires (e.g. ``{"arch": ...,
                      "resolution": 196, "checkpoint_sha256": ...}``); any mismatch is refused.
    color_jitter:     the run's colour-jitter strength (``data.color_jitter``); a cache drawn with another
                      strength is refused, as the cache defines the views (None: skip this check). A cache of
                      format version 1 holds jitter-free views: it is read with a warning whatever this is.
    verify:           check each row read against its CRC32 (format version 3); False only to measure what
                      the check costs (benchmarks/teacher_cache.py).
    """

    def __init__(self, directory: str | Path, shards: str | Path | None = None,
                 expected_teacher: Mapping[str, Any] | None = None, color_jitter: float | None = None,
                 verify: bool = True) -> None:
        self.directory = Path(directory)
        self.verify = verify
        paths = sorted(self.directory.glob(f"*{SUFFIX}"))
        if not paths:
            raise CacheError(f"{self.directory}: no teacher-cache files (*{SUFFIX}); run `itpn-ds extract-teacher`")
        self._paths = paths
        opened = [open_cache_file(p) for p in paths]
        self._files = [reader for reader, _ in opened]
        self.meta = self._common_meta(paths, [meta for _, meta in opened])
        if expected_teacher:
            self._check_teacher(expected_teacher)
        self._check_color_jitter(color_jitter)
        if shards is not None:
            self._check_shards(Path(shards), {p.name: meta for p, (_, meta) in zip(paths, opened)})
        self._batches: list[list[_Batch]] = []
        self._index: dict[str, tuple[int, int, int]] = {}
        for file_id, (path, reader) in enumerate(zip(paths, self._files)):
            self._batches.append(self._index_file(file_id, path, reader))

    # ------------------------------------------------------------------------------------------ properties
    @property
    def num_views(self) -> int:
        return self.meta.num_views

    @property
    def seed(self) -> int:
        return self.meta.seed

    @property
    def teacher(self) -> dict[str, Any]:
        return self.meta.teacher

    @property
    def color_jitter(self) -> float:
        """Strength the stored views' jitter factors were drawn with (0: none; format version 1)."""
        return self.meta.color_jitter

    def __len__(self) -> int:
        """Number of samples."""
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    # ---------------------------------------------------------------------------------------- ViewSource
    def views(self, keys: Sequence[str], sizes: Sequence[tuple[int, int]], epoch: int) -> list[tuple[int, CropView]]:
        """(view id, stored view: box, flip, jitter factors) per sample for ``epoch``; a stored box outside
        ``sizes`` is refused."""
        out = []
        for key, (width, height) in zip(keys, sizes):
            view_id = view_for_epoch(self.meta.seed, key, epoch, self.meta.num_views)
            batch, row = self._locate(key, view_id)
            x, y, w, h = (int(v) for v in batch.box[row])
            if x < 0 or y < 0 or x + w > width or y + h > height:
                raise CacheError(f"{self.directory}: cached box {(x, y, w, h)} of sample {key!r} view {view_id} "
                                 f"lies outside its {width}x{height} image: the cache was made from other images")
            jitter = NO_JITTER if batch.jitter is None else JitterFactors(*(float(f) for f in batch.jitter[row]))
            out.append((view_id, CropView(x, y, w, h, bool(batch.flip[row]), jitter)))
        return out

    def targets(self, keys: Sequence[str], view_ids: Sequence[int]) -> torch.Tensor:
        """Targets (B, T, D) float32 of those (key, view id) pairs."""
        t, d = self.meta.num_tokens, self.meta.dim
        out = np.empty((len(keys), t, d), dtype=np.float32)
        for i, (key, view_id) in enumerate(zip(keys, view_ids)):
            batch, row = self._locate(key, int(view_id))
            if self.verify:
                batch.check_row(row, f"{self._paths[self._index[key][0]]}: sample {key!r} view {view_id}")
            values = batch.targets[row].reshape(t, d)
            if batch.scales is None:
                out[i] = values
            else:
                np.multiply(values, batch.scales[row][:, None], out=out[i], dtype=np.float32)
        return torch.from_numpy(out)

    # ----------------------------------------------------------------------------------------- internals
    def _locate(self, key: str, view_id: int) -> tuple[_Batch, int]:
        try:
            file_id, batch_id, first = self._index[key]
        except KeyError:
            raise CacheError(f"sample {key!r} is not in the teacher cache {self.directory}") from None
        if not 0 <= view_id < self.meta.num_views:
            raise CacheError(f"sample {key!r}: view {view_id} asked, the cache holds views 0..{self.meta.num_views - 1}")
        return self._batches[file_id][batch_id], first + view_id

    @staticmethod
    def _common_meta(paths: list[Path], metas: list[CacheMeta]) -> CacheMeta:
        for path, meta in zip(paths, metas):
            if meta.format_version not in READABLE_VERSIONS:
                raise CacheError(f"{path}: cache format version {meta.format_version}, this code reads "
                                 f"{', '.join(map(str, READABLE_VERSIONS))}; re-run `itpn-ds extract-teacher`")
            if meta.shared() != metas[0].shared():
                diff = {k: (v, metas[0].shared()[k]) for k, v in meta.shared().items() if metas[0].shared()[k] != v}
                raise CacheError(f"{path} and {paths[0]} come from different extractions: {diff}")
        return metas[0]

    def _check_teacher(self, expected: Mapping[str, Any]) -> None:
        wrong = {k: (self.meta.teacher.get(k), v) for k, v in expected.items() if self.meta.teacher.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: cache {have!r}, run {want!r}" for k, (have, want) in wrong.items())
            raise CacheError(f"{self.directory}: teacher cache made with another teacher ({detail}); re-extract "
                             "or point teacher.cache at the matching cache")

    def _check_color_jitter(self, run: float | None) -> None:
        if self.meta.format_version == 1:
            applied = f" (data.color_jitter={run} is not applied to them)" if run else ""
            log.warning("%s: teacher cache of format version 1 stores no colour jitter: its views are replayed "
                        "jitter-free%s; re-run `itpn-ds extract-teacher` for jittered views", self.directory, applied)
        elif run is not None and run != self.meta.color_jitter:
            raise CacheError(f"{self.directory}: the cached views were drawn with colour jitter "
                             f"{self.meta.color_jitter}, the run has data.color_jitter={run}; the cache defines the "
                             f"views: set data.color_jitter={self.meta.color_jitter} or re-extract with "
                             f"`itpn-ds extract-teacher --color-jitter {run}`")

    def _check_shards(self, shards: Path, by_name: dict[str, CacheMeta]) -> None:
        from itpn_ds.data.shards import Manifest

        manifest = Manifest.load(shards)
        for shard in manifest.shards:
            name = cache_file_name(shard.tar)
            meta = by_name.get(name)
            if meta is None:
                raise CacheError(f"{self.directory / name}: missing: shard {shards / shard.tar} has no cached "
                                 "targets (extraction unfinished? re-run `itpn-ds extract-teacher`, it resumes)")
            if meta.shard_sha256 != shard.sha256 or meta.num_samples != shard.num_samples:
                raise CacheError(f"{self.directory / name}: made from a different {shard.tar} (sha256 "
                                 f"{meta.shard_sha256[:12]}..., {meta.num_samples} samples; the run's shard has "
                                 f"{shard.sha256[:12]}..., {shard.num_samples} samples)")

    def _index_file(self, file_id: int, path: Path, reader: pa.ipc.RecordBatchFileReader) -> list[_Batch]:
        k = self.meta.num_views
        batches = []
        rows = 0
        for batch_id in range(reader.num_record_batches):
            try:
                rb = reader.get_batch(batch_id)
                keys = rb.column("key").to_pylist()
                views = rb.column("view").to_numpy()
            except (pa.ArrowException, OSError) as exc:
                raise CacheError(f"{path}: corrupt record batch {batch_id}: {exc}") from exc
            if len(keys) % k or not np.array_equal(views, np.tile(np.arange(k), len(keys) // k)):
                raise CacheError(f"{path}: record batch {batch_id} does not hold whole samples with views 0..{k - 1}")
            for first in range(0, len(keys), k):
                key = keys[first]
                if keys[first:first + k] != [key] * k:
                    raise CacheError(f"{path}: rows {rows + first}..{rows + first + k - 1} mix samples")
                if key in self._index:
                    raise CacheError(f"{path}: sample {key!r} is cached twice (also in {self._paths[self._index[key][0]].name})")
                self._index[key] = (file_id, batch_id, first)
            rows += len(keys)
            batches.append(_numpy_batch(rb, self.meta))
        return batches


def open_cache_file(path: str | Path) -> tuple[pa.ipc.RecordBatchFileReader, CacheMeta]:
    """Memory-map one cache file: (reader, metadata). Truncated/corrupt/foreign files -> CacheError."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except (pa.ArrowException, OSError) as exc:
        raise CacheError(f"{path}: not a readable Arrow IPC file (truncated or corrupt?): {exc}") from exc
    raw = (reader.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise CacheError(f"{path}: not a teacher-cache file (no {META_KEY.decode()} metadata)")
    try:
        meta = CacheMeta.from_json(raw, path)
    except ValueError as exc:
        raise CacheError(str(exc)) from exc
    if meta.format_version in READABLE_VERSIONS and reader.schema.names != column_names(meta):
        raise CacheError(f"{path}: columns {reader.schema.names}, a format version {meta.format_version} "
                         f"{meta.dtype} cache has {column_names(meta)}")
    return reader, meta


def _numpy_batch(rb: pa.RecordBatch, meta: CacheMeta) -> _Batch:
    """Zero-copy numpy views of a batch's fixed-size-list columns (flattened values, reshaped)."""
    def values(name: str, width: int) -> np.ndarray:
        column = rb.column(name)
        flat = column.values.to_numpy(zero_copy_only=True)
        return flat[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)

    size = meta.num_tokens * meta.dim
    return _Batch(box=values("box", 4), flip=rb.column("flip").to_numpy(zero_copy_only=False),
                  jitter=values("jitter", JITTER_FIELDS) if meta.format_version >= 2 else None,
                  targets=values("targets", size),
                  scales=values("scales", meta.num_tokens) if meta.dtype == "int8" else None,
                  crc32=rb.column("crc32").to_numpy(zero_copy_only=False) if meta.format_version >= 3 else None)
