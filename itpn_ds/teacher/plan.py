"""Size of a teacher cache before writing it: bytes and files for (images, K, dtype, teacher).

Byte model per row (one view of one sample): the targets (T*D x 2 bytes fp16, or T*D x 1 + T x 4 bytes of
scales int8), the key (its UTF-8 bytes + a 4-byte offset), view (2), box (16), flip (1 bit) and the
colour-jitter factors (3 x 4). Arrow adds a little per record batch and per file;
``tests/test_teacher_plan.py`` checks the model against a written file.
"""
from __future__ import annotations

from dataclasses import dataclass

from itpn_ds.teacher.cache_format import DTYPES, JITTER_FIELDS

# (tokens, dim) of a teacher's targets at its default resolution (ViT-L/14 at 196 px, ViT-B/16 at 224 px).
TEACHER_SHAPES = {"ViT-L-14": (196, 768), "ViT-B-16": (196, 512)}
IMAGENET_1K_IMAGES = 1_281_167
FILE_OVERHEAD_BYTES = 4096      # schema + metadata + footer, generous
BATCH_OVERHEAD_BYTES = 1024     # record-batch message header + buffer padding, generous
SAMPLES_PER_BATCH = 64          # CacheFileWriter's default


@dataclass(frozen=True)
class CachePlan:
    """bytes_per_view: one row; total_bytes: the whole cache; read_bytes_per_epoch: one view per image."""

    num_images: int
    num_views: int
    dtype: str
    num_tokens: int
    dim: int
    files: int
    bytes_per_view: int
    total_bytes: int

    @property
    def read_bytes_per_epoch(self) -> int:
        return self.num_images * self.bytes_per_view


def row_bytes(num_tokens: int, dim: int, dtype: str, key_bytes: float) -> float:
    """Bytes of one row of a cache file (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    targets = num_tokens * dim * 2 if dtype == "fp16" else num_tokens * dim + 4 * num_tokens
    return targets + key_bytes + 4 + 2 + 16 + 1 / 8 + 4 * JITTER_FIELDS


def plan_cache(num_images: int, num_views: int, dtype: str, num_tokens: int, dim: int, files: int,
               key_bytes: int = 24) -> CachePlan:
    """Bytes of a cache of ``num_images`` x ``num_views`` rows over ``files`` files (one per shard)."""
    per_row = row_bytes(num_tokens, dim, dtype, key_bytes)
    batches = files * (-(-num_images // files) // SAMPLES_PER_BATCH + 1)
    total = num_images * num_views * per_row + batches * BATCH_OVERHEAD_BYTES + files * FILE_OVERHEAD_BYTES
    return CachePlan(num_images, num_views, dtype, num_tokens, dim, files, round(per_row), round(total))


def plan_for_teacher(arch: str, num_images: int = IMAGENET_1K_IMAGES, num_views: int = 8, dtype: str = "fp16",
                     files: int = 1024) -> CachePlan:
    """``plan_cache`` with a named teacher's (tokens, dim) from ``TEACHER_SHAPES``."""
    if arch not in TEACHER_SHAPES:
        raise ValueError(f"unknown teacher {arch!r}; known: {sorted(TEACHER_SHAPES)} (or call plan_cache)")
    tokens, dim = TEACHER_SHAPES[arch]
    return plan_cache(num_images, num_views, dtype, tokens, dim, files)
