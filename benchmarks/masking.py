"""Block masks per second (BEiT-style, 75 of 196 patches, 14 x 14 grid) on one core, as the loaders
draw them: one generator per (seed, epoch, sample index).

    python benchmarks/masking.py [--count 20000] [--out benchmarks/results/masking.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from itpn_ds.data.masking import BlockMaskGenerator, RandomMaskGenerator


def block_masks_per_second(count: int, batch: int = 64) -> float:
    generator = BlockMaskGenerator(14, 14, num_masked=75)
    generator.batch(0, 0, range(batch))  # warm-up
    start = time.perf_counter()
    for first in range(0, count, batch):
        generator.batch(0, 1, range(first, min(first + batch, count)))
    return count / (time.perf_counter() - start)


def random_masks_per_second(count: int, batch: int = 64) -> float:
    generator = RandomMaskGenerator(196, 0.75)
    start = time.perf_counter()
    for first in range(0, count, batch):
        generator.batch(0, 1, range(first, min(first + batch, count)))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--out", default="benchmarks/results/masking.json")
    args = parser.parse_args()
    rows = {"block (BEiT, 75/196)": block_masks_per_second(args.count),
            "random (MAE, 75%)": random_masks_per_second(args.count)}
    print(f"{'mask':<24} {'masks/s':>10}")
    for name, rate in rows.items():
        print(f"{name:<24} {rate:>10.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "count": args.count,
                               "masks_per_second": rows}, indent=1))


if __name__ == "__main__":
    main()
