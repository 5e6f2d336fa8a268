"""``itpn-ds plan-cache``: bytes and files a teacher cache needs (fp16 and int8), before extracting it."""
from __future__ import annotations

import argparse

from itpn_ds.teacher.cache_format import DTYPES
from itpn_ds.teacher.plan import IMAGENET_1K_IMAGES, TEACHER_SHAPES, plan_cache


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--images", type=int, default=IMAGENET_1K_IMAGES, help="number of images (default ImageNet-1K)")
    parser.add_argument("--num-views", type=int, default=8, help="K views per image")
    parser.add_argument("--teacher", choices=sorted(TEACHER_SHAPES), default="ViT-L-14")
    parser.add_argument("--tokens", type=int, default=None, help="override the teacher's tokens per view")
    parser.add_argument("--dim", type=int, default=None, help="override the teacher's target width")
    parser.add_argument("--files", type=int, default=1024, help="cache files = input shards")
    parser.add_argument("--dtype", choices=DTYPES, action="append", help="dtype(s) to plan (default both)")


def main(args: argparse.Namespace) -> int:
    tokens, dim = TEACHER_SHAPES[args.teacher]
    tokens, dim = args.tokens or tokens, args.dim or dim
    print(f"{args.images:,} images x {args.num_views} views, {args.teacher} targets {tokens} x {dim}, "
          f"{args.files} files")
    print(f"{'dtype':6} {'per view':>10} {'total':>10} {'per file':>10} {'read/epoch':>11}")
    for dtype in args.dtype or DTYPES:
        plan = plan_cache(args.images, args.num_views, dtype, tokens, dim, args.files)
        print(f"{dtype:6} {plan.bytes_per_view / 1e3:>8.1f}KB {plan.total_bytes / 1e12:>8.3f}TB "
              f"{plan.total_bytes / args.files / 1e9:>8.2f}GB {plan.read_bytes_per_epoch / 1e9:>9.1f}GB")
    return 0
