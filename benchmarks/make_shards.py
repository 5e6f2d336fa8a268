"""``make-shards`` throughput: images and input bytes per second per worker process, on ImageNet-sized JPEGs.

``--images`` demo photos (``data_tools.demo_images``: scikit-image's photos, random crops rescaled to
``--min-side``..``--max-side`` px, about ImageNet's 400 x 350 px average) are written once under ``--work``, then
sharded by ``write_shards`` (what ``itpn-ds make-shards`` runs: every image decoded once, clean RGB JPEGs stored
byte for byte, SHA-256 and per-member CRC32, DALI index) with each ``--workers`` count, into a fresh directory
each time. Reported: wall seconds, images/s, input MB/s, per worker process, and CPU ms per image (this
process and its workers, ``getrusage``: the cost of an image whatever else runs on the machine). The figure feeds the shard
making line of docs/scaling.md's budget (ImageNet-1K's 1,281,167 images at that rate per process).

    python benchmarks/make_shards.py [--images 2400] [--workers 1 2] [--out benchmarks/results/make_shards.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.demo_images import SOURCE_PHOTOS, make_demo_image_folder  # noqa: E402
from itpn_ds.data.shards import write_shards  # noqa: E402
from itpn_ds.data.sources import image_folder_items, shuffled  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--min-side", type=int, default=300)
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("/tmp/itpn-make-shards"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/make_shards.json"))
    return p.parse_args(argv)


def images_folder(args: argparse.Namespace) -> Path:
    """The demo photos, written once per (images, sides)."""
    folder = args.work / f"images-{args.images}-{args.min_side}-{args.max_side}"
    if not folder.is_dir():
        make_demo_image_folder(folder, -(-args.images // len(SOURCE_PHOTOS)), seed=0, min_side=args.min_side,
                               max_side=args.max_side)
    return folder


def time_sharding(folder: Path, out: Path, workers: int, num_shards: int) -> dict:
    items, classes = image_folder_items(folder)
    input_bytes = sum(os.path.getsize(item.path) for item in items)
    shutil.rmtree(out, ignore_errors=True)
    cpu_before, start = cpu_seconds(), time.perf_counter()
    manifest = write_shards(shuffled(items, 0), out, classes, str(folder), num_shards=num_shards, num_workers=workers,
                            progress=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
    return {"workers": workers, "images": len(manifest), "input_bytes": input_bytes,
            "shard_bytes": sum(s.bytes for s in manifest.shards), "seconds": seconds,
            "images_per_s": len(manifest) / seconds, "images_per_s_per_worker": len(manifest) / seconds / workers,
            "input_mb_per_s": input_bytes / seconds / 1e6, "cpu_ms_per_image": 1e3 * cpu / len(manifest)}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    folder = images_folder(args)
    runs = [time_sharding(folder, args.work / f"shards-{w}", w, args.num_shards) for w in args.workers]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_end": os.getloadavg()[0],
              "sides": [args.min_side, args.max_side], "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    first = runs[0]
    print(f"{first['images']} images, {first['input_bytes'] / first['images'] / 1e3:.0f} KB each on average, "
          f"{args.min_side}-{args.max_side} px; load average at the end {result['load_average_end']:.1f}")
    print(f"{'workers':>7} {'s':>7} {'images/s':>9} {'per worker':>11} {'input MB/s':>11} {'CPU ms/image':>13}")
    for run in runs:
        print(f"{run['workers']:>7} {run['seconds']:>7.1f} {run['images_per_s']:>9.1f} "
              f"{run['images_per_s_per_worker']:>11.1f} {run['input_mb_per_s']:>11.1f} {run['cpu_ms_per_image']:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
