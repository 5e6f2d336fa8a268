"""Teacher targets per second: reading a memory-mapped cache from a cold file and from the page cache vs
running the teacher.

A cache of ``--images`` x ``--views`` rows with the teacher's target shape is written (random targets: reading
speed does not depend on values). Every (key, view) pair is then read once, in a random order, in batches of
64 with ``TeacherCache.targets``: first from a cold file (written data flushed with ``fsync`` and the file's
pages dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``; the fraction still resident,
from ``mincore``, is reported), then the same order again from the page cache (warm), and once more from the
page cache without the per-row CRC32 check (what the check costs). The same number of
targets is computed by a random-initialized open_clip teacher of ``--arch`` in the same run. Default ViT-B-16
at 224 px (196 x 512 targets): CLIP-L is too slow for 2 CPU cores. ``--work`` must not be a tmpfs (its pages
cannot be dropped).

    python benchmarks/teacher_cache.py [--arch ViT-B-16] [--work DIR] [--out benchmarks/results/teacher_cache.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from itpn_ds.data.views import CropView
from itpn_ds.teacher.cache import TeacherCache
from itpn_ds.teacher.cache_format import SUFFIX, CacheFileWriter, CacheMeta
from itpn_ds.teacher.clip import load_clip_teacher

BATCH = 64


def write_random_cache(out: Path, images: int, views: int, tokens: int, dim: int, dtype: str) -> list[str]:
    """One file of ``images`` samples x ``views`` rows of random targets; returns the keys."""
    meta = CacheMeta(teacher={"arch": "benchmark"}, dtype=dtype, num_views=views, seed=0, num_tokens=tokens,
                     dim=dim, shard="bench.tar", shard_sha256="0" * 64, num_samples=images)
    writer = CacheFileWriter(out / "bench.arrow", meta)
    keys = [f"class_{i % 1000:04d}/image_{i:08d}" for i in range(images)]
    generator = torch.Generator().manual_seed(0)
    for key in keys:
        writer.add(key, [CropView(0, 0, 8, 8, False)] * views, torch.randn(views, tokens, dim, generator=generator))
    writer.close()
    return keys


def reading_order(keys: list[str], views: int) -> list[tuple[list[str], list[int]]]:
    """Every (key, view) pair once, in a seeded random order, as batches of ``BATCH`` (keys, view ids)."""
    pairs = np.random.default_rng(0).permutation(len(keys) * views)
    return [([keys[p // views] for p in chunk], [int(p % views) for p in chunk])
            for chunk in np.array_split(pairs, max(1, len(pairs) // BATCH))]


def read_rate(cache: TeacherCache, batches: list[tuple[list[str], list[int]]]) -> float:
    """Targets per second reading ``batches`` (float32 out, as training gets them)."""
    start = time.perf_counter()
    for keys, view_ids in batches:
        cache.targets(keys, view_ids)
    return sum(len(keys) for keys, _ in batches) / (time.perf_counter() - start)


def evict(directory: Path) -> None:
    """Flush the cache files' written pages to the disk and drop them from the page cache."""
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(directory: Path) -> float:
    """Fraction of the cache files' pages in the page cache now (``mincore`` over a fresh read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    resident = total = 0
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        size = path.stat().st_size
        pages = -(-size // mmap.PAGESIZE)
        with open(path, "rb") as fh:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vector = ctypes.create_string_buffer(pages)
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            resident += sum(byte & 1 for byte in vector.raw)
            total += pages
        finally:
            libc.munmap(address, size)
    return resident / max(total, 1)


def teacher_rate(arch: str, work: Path, batches: int) -> tuple[float, int, int]:
    """(targets/s, tokens, dim) of a random-initialized teacher of ``arch`` on the CPU."""
    import open_clip

    torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), work / "teacher.pt")
    teacher = load_clip_teacher(work / "teacher.pt", arch=arch)
    images = torch.rand(BATCH, 3, teacher.resolution, teacher.resolution)
    teacher(images[:2])  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        teacher(images)
    return batches * BATCH / (time.perf_counter() - start), teacher.num_tokens, teacher.dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--teacher-batches", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="directory for the caches (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results/teacher_cache.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        computed, tokens, dim = teacher_rate(args.arch, work, args.teacher_batches)
        rows = {"teacher " + args.arch: {"targets_per_s": computed, "MB_per_s": None}}
        resident = {}
        for dtype in ("fp16", "int8"):
            (work / dtype).mkdir()
            keys = write_random_cache(work / dtype, args.images, args.views, tokens, dim, dtype)
            order = reading_order(keys, args.views)
            per_view = tokens * dim * (2 if dtype == "fp16" else 1) + (4 * tokens if dtype == "int8" else 0)
            evict(work / dtype)
            resident[dtype] = resident_fraction(work / dtype)
            cache = TeacherCache(work / dtype)
            for temperature in ("cold file", "page cache"):
                rate = read_rate(cache, order)
                rows[f"cache {dtype} ({temperature})"] = {"targets_per_s": rate, "MB_per_s": rate * per_view / 1e6}
            rate = read_rate(TeacherCache(work / dtype, verify=False), order)
            rows[f"cache {dtype} (page cache, no CRC32)"] = {"targets_per_s": rate, "MB_per_s": rate * per_view / 1e6}
    print(f"{'source':<28} {'targets/s':>10} {'MB/s':>8} {'vs teacher':>10}")
    for name, row in rows.items():
        mbs = f"{row['MB_per_s']:.0f}" if row["MB_per_s"] else "-"
        print(f"{name:<28} {row['targets_per_s']:>10.0f} {mbs:>8} {row['targets_per_s'] / computed:>9.1f}x")
    print("resident before the cold read: " + ", ".join(f"{k} {v:.1%}" for k, v in resident.items()))
    result = {"arch": args.arch, "tokens": tokens, "dim": dim, "images": args.images, "views": args.views,
              "batch": BATCH, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": rows,
              "resident_before_cold": resident}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
