"""Teacher targets per second: reading random batches from a memory-mapped cache vs running the teacher.

A cache of ``--images`` x ``--views`` rows with the teacher's target shape is written (random targets: reading
speed does not depend on values), then random batches of 64 (key, view) pairs are read with
``TeacherCache.targets``; the same number of targets is computed by a random-initialized open_clip teacher of
``--arch`` in the same run. Default ViT-B-16 at 224 px (196 x 512 targets): CLIP-L is too slow for 2 CPU cores.

    python benchmarks/teacher_cache.py [--arch ViT-B-16] [--out benchmarks/results/teacher_cache.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from itpn_ds.data.views import CropView
from itpn_ds.teacher.cache import TeacherCache
from itpn_ds.teacher.cache_format import CacheFileWriter, CacheMeta
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


def read_rate(cache: TeacherCache, keys: list[str], batches: int) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(batches):
        picks = rng.integers(0, len(keys), BATCH)
        cache.targets([keys[i] for i in picks], rng.integers(0, cache.num_views, BATCH).tolist())
    return batches * BATCH / (time.perf_counter() - start)


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
    parser.add_argument("--read-batches", type=int, default=200)
    parser.add_argument("--teacher-batches", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/teacher_cache.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        computed, tokens, dim = teacher_rate(args.arch, work, args.teacher_batches)
        rows = {"teacher " + args.arch: {"targets_per_s": computed, "MB_per_s": None}}
        for dtype in ("fp16", "int8"):
            (work / dtype).mkdir()
            keys = write_random_cache(work / dtype, args.images, args.views, tokens, dim, dtype)
            rate = read_rate(TeacherCache(work / dtype), keys, args.read_batches)
            per_view = tokens * dim * (2 if dtype == "fp16" else 1) + (4 * tokens if dtype == "int8" else 0)
            rows[f"cache {dtype} (mmap)"] = {"targets_per_s": rate, "MB_per_s": rate * per_view / 1e6}
    print(f"{'source':<24} {'targets/s':>10} {'MB/s':>8} {'vs teacher':>10}")
    for name, row in rows.items():
        mbs = f"{row['MB_per_s']:.0f}" if row["MB_per_s"] else "-"
        print(f"{name:<24} {row['targets_per_s']:>10.0f} {mbs:>8} {row['targets_per_s'] / computed:>9.1f}x")
    result = {"arch": args.arch, "tokens": tokens, "dim": dim, "images": args.images, "views": args.views,
              "batch": BATCH, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
