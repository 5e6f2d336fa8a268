"""``itpn-ds plan-cache``: bytes and files a teacher cache needs (fp16 and int8), before extracting it, and
the read bandwidth a run at a given rate needs from it (and from the shards) next to the teacher compute it
saves.

The shard layout (images, shard files = cache files, shard bytes) is read from ``--shards DIR``'s manifest
when given; otherwise ``--images`` / ``--files`` or, by default, the layout assumed for ImageNet-1K through
make-shards' default 1 GiB shards (``itpn_ds.scaling.cache_plan.IMAGENET_1K_LAYOUT``), said in the first line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from itpn_ds.data.shards import ShardError, ShardLayout
from itpn_ds.teacher.cache_format import DTYPES
from itpn_ds.scaling.cache_plan import (IMAGENET_1K_LAYOUT, PLANNED_IMAGES_PER_S_PER_NODE, TEACHER_SHAPES, cache_reads,
                                  plan_cache)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--shards", type=Path, help="a make-shards output directory: its manifest gives the images, "
                                                    "shard files and shard bytes")
    parser.add_argument("--images", type=int, default=None,
                        help=f"number of images (default ImageNet-1K, {IMAGENET_1K_LAYOUT.images:,})")
    parser.add_argument("--num-views", type=int, default=8, help="K views per image")
    parser.add_argument("--teacher", choices=sorted(TEACHER_SHAPES), default="ViT-L-14")
    parser.add_argument("--tokens", type=int, default=None, help="override the teacher's tokens per view")
    parser.add_argument("--dim", type=int, default=None, help="override the teacher's target width")
    parser.add_argument("--files", type=int, default=None,
                        help=f"cache files = input shards (default {IMAGENET_1K_LAYOUT.shards}: ImageNet-1K in "
                             "make-shards' default 1 GiB shards)")
    parser.add_argument("--dtype", choices=DTYPES, action="append", help="dtype(s) to plan (default both)")
    parser.add_argument("--node-images-per-s", type=float, default=PLANNED_IMAGES_PER_S_PER_NODE,
                        help="training images/s per node the reads must keep up with (default: the scaling "
                             "plan's iTPN-L rate, 953/s per H100 x 8, docs/scaling.md)")
    parser.add_argument("--nodes", type=int, default=8, help="nodes reading the cache (default 8 = 64 GPUs)")


def shard_layout(args: argparse.Namespace) -> tuple[ShardLayout, str]:
    """(the layout planned, where it comes from): ``--shards``' manifest, or ``--images`` / ``--files`` over the
    ImageNet-1K assumption (shard bytes per image kept from it)."""
    if args.shards is not None:
        if args.images is not None or args.files is not None:
            raise ShardError(f"--shards {args.shards} gives the images and files: drop --images / --files")
        return ShardLayout.of(args.shards), f"from {args.shards}/manifest.json"
    assumed = IMAGENET_1K_LAYOUT
    images, files = args.images or assumed.images, args.files or assumed.shards
    if images < 1 or files < 1:
        raise ShardError("--images and --files must be >= 1")
    if (images, files) == (assumed.images, assumed.shards):
        return assumed, "assumed: ImageNet-1K train in make-shards' default 1 GiB shards"
    layout = ShardLayout(images, files, round(images * assumed.bytes_per_image))
    return layout, f"given; shard bytes assumed at ImageNet-1K's {assumed.bytes_per_image / 1e3:.0f} KB per image"


def main(args: argparse.Namespace) -> int:
    tokens, dim = TEACHER_SHAPES[args.teacher]
    tokens, dim = args.tokens or tokens, args.dim or dim
    if args.node_images_per_s <= 0 or args.nodes < 1:
        print("itpn-ds plan-cache: error: --node-images-per-s must be > 0 and --nodes >= 1", file=sys.stderr)
        return 2
    layout, origin = shard_layout(args)
    print(f"shards ({origin}): {layout.images:,} images in {layout.shards} shards, {layout.bytes / 1e9:.1f} GB "
          f"({layout.bytes / layout.shards / 1e9:.2f} GB per shard); shards read at "
          f"{args.node_images_per_s * layout.bytes_per_image / 1e9:.2f} GB/s per node")
    print(f"{layout.images:,} images x {args.num_views} views, {args.teacher} targets {tokens} x {dim}, "
          f"{layout.shards} files; reads at {args.node_images_per_s:,.0f} images/s per node x {args.nodes} nodes")
    print(f"{'dtype':6} {'per view':>10} {'total':>10} {'per file':>10} {'read/epoch':>11} {'read/node':>11} "
          f"{'read/cluster':>13}")
    for dtype in args.dtype or DTYPES:
        plan = plan_cache(layout.images, args.num_views, dtype, tokens, dim, layout.shards)
        reads = cache_reads(plan, args.node_images_per_s, args.nodes, args.teacher)
        print(f"{dtype:6} {plan.bytes_per_view / 1e3:>8.1f}KB {plan.total_bytes / 1e12:>8.3f}TB "
              f"{plan.total_bytes / layout.shards / 1e9:>8.2f}GB {plan.read_bytes_per_epoch / 1e9:>9.1f}GB "
              f"{reads.node_bytes_per_s / 1e9:>7.2f}GB/s {reads.cluster_bytes_per_s / 1e9:>9.2f}GB/s")
    if not (args.tokens or args.dim):
        print(f"teacher compute saved: {reads.teacher_flops_per_image / 1e9:.1f} GFLOPs per image x "
              f"{args.node_images_per_s:,.0f} images/s = {reads.node_teacher_flops_per_s / 1e15:.2f} PFLOP/s per node, "
              f"{reads.nodes * reads.node_teacher_flops_per_s / 1e15:.2f} PFLOP/s for the cluster")
    return 0
