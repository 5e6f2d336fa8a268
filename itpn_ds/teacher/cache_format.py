"""Teacher-cache file format: one Arrow IPC file per input shard, written atomically.

``<shard stem>.arrow`` (e.g. ``shard-00000.arrow`` for ``shard-00000.tar``) holds one row per (sample, view):

=========  ====================================  ==============================================================
column     Arrow type                            meaning
=========  ====================================  ==============================================================
key        string                                sample key (as in the shard manifest)
view       int16                                 view id 0..K-1
box        fixed_size_list<int32>[4]             crop box x, y, w, h in source-image pixels
flip       bool                                  horizontal flip
jitter     fixed_size_list<float32>[3]           colour-jitter factors: brightness, contrast, saturation
                                                 (1, 1, 1: none); format version 2 on
targets    fixed_size_list<float16>[T*D]         teacher targets, row-major (T, D)  (dtype ``fp16``)
           fixed_size_list<int8>[T*D]            quantized targets                   (dtype ``int8``)
scales     fixed_size_list<float32>[T]           per-token scale: target = int8 * scale (``int8`` only)
crc32      uint32                                CRC32 of the row's box, flip, jitter, targets and scales
                                                 (:func:`row_crc32`), checked when the row is read; version 3 on
=========  ====================================  ==============================================================

Rows are grouped by sample, views in order 0..K-1, and every record batch holds whole samples, so a
sample's K rows sit in one batch. The schema metadata key ``itpn_ds.teacher_cache`` holds
:class:`CacheMeta` as JSON (teacher identity, view policy, dtype, shapes, source shard and its sha256).

Versions: 3 (written) adds the per-row ``crc32`` column; 2 (still read, unchecked) adds the ``jitter``
column and ``CacheMeta.color_jitter`` (the strength the factors were drawn with); 1 (still read) has
neither: its views are jitter-free.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from itpn_ds import __version__
from itpn_ds.data.views import DEFAULT_RATIO, DEFAULT_SCALE, CropView

FORMAT_VERSION = 3             # written
READABLE_VERSIONS = (1, 2, 3)  # 1: no jitter column, read as jitter-free views; 1-2: no crc32 column
JITTER_FIELDS = 3              # brightness, contrast, saturation
META_KEY = b"itpn_ds.teacher_cache"
SUFFIX = ".arrow"
PARTIAL_SUFFIX = ".partial"    # NAME.arrow.partial: a suspended file's samples (CacheFileWriter.suspend)
DTYPES = ("fp16", "int8")
INT8_MAX = 127.0


@dataclass(frozen=True)
class CacheMeta:
    """What one cache file was made from and how (all files of a cache agree except ``shard*``).

    teacher:        ``TeacherIdentity.as_dict()``: arch, checkpoint_sha256, resolution, normalization.
    num_views:      K views per sample; view ids 0..K-1 drawn by ``sample_view(seed, key, view_id, w, h,
                    color_jitter=color_jitter)``.
    num_tokens/dim: shape (T, D) of one view's targets.
    interp:         resize interpolation of the teacher view (the pipeline's teacher view uses the same).
    color_jitter:   colour-jitter strength of the views (0: none; always 0 in format version 1).
    shard/shard_sha256/num_samples: the input shard this file covers.
    """

    teacher: dict[str, Any]
    dtype: str
    num_views: int
    seed: int
    num_tokens: int
    dim: int
    shard: str
    shard_sha256: str
    num_samples: int
    scale: tuple[float, float] = DEFAULT_SCALE
    ratio: tuple[float, float] = DEFAULT_RATIO
    interp: str = "lanczos"
    color_jitter: float = 0.0
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {DTYPES}, got {self.dtype!r}")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str | Path) -> "CacheMeta":
        try:
            data = json.loads(raw)
            data["scale"], data["ratio"] = tuple(data["scale"]), tuple(data["ratio"])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad teacher-cache metadata: {exc}") from exc

    def differences(self, other: "CacheMeta") -> list[str]:
        """The fields that decide the stored values (teacher, views, dtype, shapes, source shard, format) in
        which two files differ; empty: made the same way."""
        fields = ("teacher", "dtype", "num_views", "seed", "color_jitter", "num_tokens", "dim", "shard_sha256",
                  "num_samples", "format_version")
        return sorted(f for f in fields if getattr(self, f) != getattr(other, f))

    def shared(self) -> dict[str, Any]:
        """The fields every file of one cache must agree on."""
        return {k: v for k, v in asdict(self).items() if k not in ("shard", "shard_sha256", "num_samples")}


def cache_file_name(shard_tar: str) -> str:
    """``shard-00000.tar`` -> ``shard-00000.arrow``."""
    return Path(shard_tar).stem + SUFFIX


def schema(meta: CacheMeta) -> pa.Schema:
    """The Arrow schema of a file of the current format version (the writer's)."""
    if meta.format_version != FORMAT_VERSION:
        raise ValueError(f"cache files are written in format version {FORMAT_VERSION}, not {meta.format_version}")
    size = meta.num_tokens * meta.dim
    fields = [pa.field("key", pa.string()), pa.field("view", pa.int16()),
              pa.field("box", pa.list_(pa.int32(), 4)), pa.field("flip", pa.bool_()),
              pa.field("jitter", pa.list_(pa.float32(), JITTER_FIELDS))]
    if meta.dtype == "fp16":
        fields.append(pa.field("targets", pa.list_(pa.float16(), size)))
    else:
        fields += [pa.field("targets", pa.list_(pa.int8(), size)),
                   pa.field("scales", pa.list_(pa.float32(), meta.num_tokens))]
    fields.append(pa.field("crc32", pa.uint32()))
    return pa.schema(fields, metadata={META_KEY: meta.to_json()})


def column_names(meta: CacheMeta) -> list[str]:
    """The columns of a file of ``meta``'s format version and dtype (version 1: no ``jitter``; 1-2: no ``crc32``)."""
    names = schema(replace(meta, format_version=FORMAT_VERSION)).names
    absent = {1: ("jitter", "crc32"), 2: ("crc32",)}.get(meta.format_version, ())
    return [name for name in names if name not in absent]


def row_crc32(box: np.ndarray, flip: bool, jitter: np.ndarray, targets: np.ndarray, scales: np.ndarray | None) -> int:
    """CRC32 of one row's stored values (box int32 (4,), flip, jitter float32 (3,), targets fp16/int8 (T*D,),
    scales float32 (T,) or None), in that order."""
    crc = zlib.crc32(np.ascontiguousarray(box).tobytes())
    crc = zlib.crc32(b"\x01" if flip else b"\x00", crc)
    crc = zlib.crc32(np.ascontiguousarray(jitter).tobytes(), crc)
    crc = zlib.crc32(np.ascontiguousarray(targets).tobytes(), crc)
    return crc if scales is None else zlib.crc32(np.ascontiguousarray(scales).tobytes(), crc)


def quantize_int8(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., T, D) float -> (int8 (..., T, D), float32 scale (..., T)); symmetric, one scale per token."""
    x = targets.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / INT8_MAX
    q = torch.round(x / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 (..., T, D) and scale (..., T) -> float32 (..., T, D)."""
    return q.astype(np.float32) * scale[..., None]


def _fixed_list(values: np.ndarray, arrow_type: pa.DataType, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=arrow_type), size)


class CacheFileWriter:
    """Write one cache file: ``add`` whole samples, ``close`` renames ``NAME.tmp`` to ``NAME``.

    Samples are buffered and flushed as one record batch every ``samples_per_batch`` samples. ``suspend``
    (preemption) keeps every sample added so far as ``NAME.partial``, and the next writer of the same path
    continues it: it starts with ``num_samples`` samples, and the file it finishes is byte for byte the one
    an uninterrupted writer makes (the partial's short last batch is filled up before it is written). A
    writer left unclosed (crash) leaves only the temporary file, which the next run overwrites; the last
    partial stays until the file is finished. As a context manager it closes on success and, on an
    exception, releases the temporary file without finishing it.
    """

    def __init__(self, path: str | Path, meta: CacheMeta, samples_per_batch: int = 64) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.partial_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.meta = meta
        self.samples_per_batch = samples_per_batch
        self._schema = schema(meta)
        self._pending: list[pa.RecordBatch] = []  # the K rows of each sample not yet written
        self.num_samples = 0
        carried = self._read_partial() if self.partial_path.exists() else []  # checked before anything is written
        self._sink = pa.OSFile(str(self.tmp_path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self._schema)
        for batch in carried:
            self._carry(batch)

    def add(self, key: str, views: Sequence[CropView], targets: torch.Tensor) -> None:
        """One sample: its K views (in view-id order) and their targets (K, T, D)."""
        expected = (self.meta.num_views, self.meta.num_tokens, self.meta.dim)
        if len(views) != self.meta.num_views or tuple(targets.shape) != expected:
            raise ValueError(f"sample {key!r}: {len(views)} views and targets {tuple(targets.shape)}, the cache "
                             f"takes {self.meta.num_views} views and {expected}")
        self._append(self._rows(key, views, targets.detach().cpu()))

    def _append(self, sample_rows: pa.RecordBatch) -> None:
        self._pending.append(sample_rows)
        self.num_samples += 1
        if len(self._pending) >= self.samples_per_batch:
            self._flush()

    def _rows(self, key: str, views: Sequence[CropView], targets: torch.Tensor) -> pa.RecordBatch:
        """The K rows of one sample; targets (K, T, D) float."""
        k, size = self.meta.num_views, self.meta.num_tokens * self.meta.dim
        boxes = np.array([v.box() for v in views], dtype=np.int32)
        flips = [v.flip for v in views]
        jitters = np.stack([v.jitter.as_array() for v in views]).astype(np.float32)
        columns = [pa.array([key] * k, pa.string()), pa.array(np.arange(k, dtype=np.int16)),
                   _fixed_list(boxes, pa.int32(), 4), pa.array(flips, pa.bool_()),
                   _fixed_list(jitters, pa.float32(), JITTER_FIELDS)]
        if self.meta.dtype == "fp16":
            stored, scales = targets.to(torch.float16).numpy().reshape(k, size), None
            columns.append(_fixed_list(stored, pa.float16(), size))
        else:
            q, scale = quantize_int8(targets)
            stored, scales = q.numpy().reshape(k, size), scale.numpy().astype(np.float32)
            columns += [_fixed_list(stored, pa.int8(), size), _fixed_list(scales, pa.float32(), self.meta.num_tokens)]
        crcs = [row_crc32(boxes[i], flips[i], jitters[i], stored[i], None if scales is None else scales[i])
                for i in range(k)]
        columns.append(pa.array(crcs, pa.uint32()))
        return pa.record_batch(columns, schema=self._schema)

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self._schema).combine_chunks()
        self._writer.write_batch(table.to_batches()[0])
        self._pending = []

    def _read_partial(self) -> list[pa.RecordBatch]:
        """The record batches of a suspended writer of this path, refused when made differently."""
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(self.partial_path)))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{self.partial_path}: not a readable suspended extraction ({exc}); delete it") from exc
        made = CacheMeta.from_json((reader.schema.metadata or {}).get(META_KEY, b"null"), self.partial_path)
        differ = made.differences(self.meta)
        if differ:
            raise ValueError(f"{self.partial_path}: a suspended extraction made differently ({', '.join(differ)} "
                             "differ); delete it or choose another --out")
        return [pa.record_batch(reader.get_batch(i).columns, schema=self._schema)
                for i in range(reader.num_record_batches)]

    def _carry(self, batch: pa.RecordBatch) -> None:
        """Take over one batch of a partial file: a whole batch is written as it is, a short one (the last)
        becomes pending samples."""
        k = self.meta.num_views
        if batch.num_rows == self.samples_per_batch * k:
            self._writer.write_batch(batch)
            self.num_samples += self.samples_per_batch
        else:
            for first in range(0, batch.num_rows, k):
                self._append(batch.slice(first, k))

    def __enter__(self) -> "CacheFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._sink.closed:
            self._sink.close()

    def suspend(self) -> Path:
        """Keep the samples added so far as ``NAME.partial`` for the next writer of this path; returns it."""
        self._flush()
        self._writer.close()
        self._sink.close()
        os.replace(self.tmp_path, self.partial_path)
        return self.partial_path

    def close(self) -> Path:
        """Finish the file; refuses one whose sample count differs from the shard's."""
        self._flush()
        self._writer.close()
        self._sink.close()
        if self.num_samples != self.meta.num_samples:
            raise ValueError(f"{self.tmp_path}: {self.num_samples} samples written, shard {self.meta.shard} has "
                             f"{self.meta.num_samples}; the file is left unfinished")
        os.replace(self.tmp_path, self.path)
        self.partial_path.unlink(missing_ok=True)
        return self.path
