"""``itpn-ds make-shards``: preprocess an ImageFolder tree or a CSV/TSV table into WebDataset shards,
DALI index files and a manifest (format: ``itpn_ds.data.shards``).

Re-running with the same arguments keeps the shards an earlier run finished. Files that cannot be
decoded are listed in ``bad_files.tsv`` and counted in the manifest; the command exits 1 when their
fraction exceeds ``--max-bad-fraction``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from itpn_ds.data.preprocess import PreprocessOptions
from itpn_ds.data.shards import ShardError, write_shards
from itpn_ds.data.sources import image_folder_items, shuffled, table_items


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("source", type=Path, help="ImageFolder root (<class>/<image>) or a .csv/.tsv of path,label")
    parser.add_argument("out", type=Path, help="output shard directory")
    parser.add_argument("--shard-size", type=float, default=1024.0,
                        help="target shard size in MiB of input bytes (default 1024)")
    parser.add_argument("--max-short-side", type=int, default=0,
                        help="re-encode images whose shorter side exceeds this many px down to it (0 = keep)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--reencode-all", action="store_true", help="re-encode even clean RGB JPEGs")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards")
    parser.add_argument("--max-bad-fraction", type=float, default=0.001,
                        help="exit 1 when more than this fraction of the inputs is bad (default 0.001)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args: argparse.Namespace) -> int:
    if args.source.is_file():
        items, classes = table_items(args.source)
    else:
        items, classes = image_folder_items(args.source)
    options = PreprocessOptions(args.max_short_side, args.quality, args.reencode_all)
    manifest = write_shards(shuffled(items, args.seed), args.out, classes, str(args.source), options,
                            target_shard_bytes=int(args.shard_size * (1 << 20)), num_workers=args.workers,
                            progress=not args.quiet)
    total = len(manifest) + manifest.num_bad
    print(f"{len(manifest)} samples in {len(manifest.shards)} shards, {manifest.num_classes} classes, "
          f"{manifest.num_bad} bad ({args.out / manifest.bad_report}) -> {args.out}")
    if manifest.num_bad > args.max_bad_fraction * total:
        raise ShardError(f"{manifest.num_bad} of {total} inputs are bad, more than --max-bad-fraction "
                         f"{args.max_bad_fraction}; see {args.out / manifest.bad_report} (fix or remove them, or "
                         "raise --max-bad-fraction)")
    return 0
