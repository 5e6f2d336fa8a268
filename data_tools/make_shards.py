"""``itpn-ds make-shards``: preprocess an ImageFolder tree or a CSV/TSV table into WebDataset shards,
DALI index files and a manifest (format: ``itpn_ds.data.shards``). ``--kind segmentation`` takes an image
tree with ``--annotations`` the label-map tree beside it (ADE20K) and ``--class-names``; ``--kind
detection`` takes an image directory with ``--annotations`` a COCO instances JSON
(``itpn_ds.data.dense_sources``). Annotations that do not fit their image (size, label values, boxes,
missing images) are bad samples like undecodable images.

``--classes-from SHARDS_OR_FILE`` numbers a classification split as an existing shard set (its manifest) or a
class-names file does, so a validation split gets training's label ids whatever classes it holds; an input
whose class is not in that list is a bad input (listed and counted), never a new class.

Shards hold about ``--shard-size`` MiB of input each (default 1 GiB: about 138 shards for ImageNet-1K's
train split), or ``--num-shards N`` gives exactly N shards of about equal bytes, e.g. a multiple of the
extraction workers (one shard is one extraction work unit and one cache file); the two are exclusive.

Re-running with the same arguments keeps the shards an earlier run finished. Files that cannot be
decoded are listed in ``bad_files.tsv`` and counted in the manifest; the command exits 2 when their
fraction exceeds ``--max-bad-fraction``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from itpn_ds.data.annotations import CLASSIFICATION, DETECTION, KINDS, SEGMENTATION, DenseSpec
from itpn_ds.data.class_map import read_class_list
from itpn_ds.data.dense_sources import coco_items, read_class_names, segmentation_items
from itpn_ds.data.preprocess import PreprocessOptions
from itpn_ds.data.shards import ShardError, SourceItem, write_shards
from itpn_ds.data.sources import image_folder_items, renumber, shuffled, table_items

DEFAULT_SHARD_MIB = 1024.0


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("source", type=Path, help="ImageFolder root (<class>/<image>) or a .csv/.tsv of path,label; "
                                                  "segmentation/detection: the image directory")
    parser.add_argument("out", type=Path, help="output shard directory")
    parser.add_argument("--kind", choices=KINDS, default=CLASSIFICATION, help="shard kind (default classification)")
    parser.add_argument("--annotations", type=Path, help="segmentation: label-map directory (same relative paths, "
                                                         ".png); detection: COCO instances JSON")
    parser.add_argument("--class-names", type=Path, help="segmentation: class names, one per line, training-id "
                                                         "order (with --reduce-zero-label the first names raw label 1)")
    parser.add_argument("--classes-from", type=Path, metavar="SHARDS_OR_FILE",
                        help="classification: number the classes as this shard directory or class-names file "
                             "(one per line) does; inputs of other classes are bad inputs")
    parser.add_argument("--reduce-zero-label", action="store_true",
                        help="segmentation: raw label 0 is ignored and raw v is class v - 1 (ADE20K)")
    parser.add_argument("--shard-size", type=float, default=None,
                        help=f"target shard size in MiB of input bytes (default {DEFAULT_SHARD_MIB:g})")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="write exactly this many shards of about equal input bytes instead of a target size "
                             "(e.g. a multiple of the extraction workers and training ranks)")
    parser.add_argument("--max-short-side", type=int, default=0,
                        help="re-encode images whose shorter side exceeds this many px down to it (0 = keep)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--reencode-all", action="store_true", help="re-encode even clean RGB JPEGs")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards")
    parser.add_argument("--max-bad-fraction", type=float, default=0.001,
                        help="exit 2 when more than this fraction of the inputs is bad (default 0.001)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


@dataclass
class Inputs:
    """What the command line lists: the items, the class map they are labelled by, the dense kind's spec (None:
    classification) and the (path, reason) of inputs refused before writing."""

    items: list[SourceItem]
    classes: dict[str, int]
    spec: DenseSpec | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)


def list_inputs(args: argparse.Namespace) -> Inputs:
    """The inputs of the command line's source and kind."""
    if args.classes_from is not None and args.kind != CLASSIFICATION:
        raise ShardError(f"--classes-from is for classification shards; --kind {args.kind} takes its classes from "
                         "--class-names (segmentation) or the annotation file (detection)")
    if args.kind == CLASSIFICATION:
        items, classes = table_items(args.source) if args.source.is_file() else image_folder_items(args.source)
        if args.classes_from is None:
            return Inputs(items, classes)
        target = read_class_list(args.classes_from)
        kept, rejected = renumber(items, classes, target, str(args.classes_from))
        if not kept:
            raise ShardError(f"{args.source}: none of its classes ({', '.join(sorted(classes)[:5])}, ...) is in the "
                             f"class list of --classes-from {args.classes_from}: give the split of that data set")
        return Inputs(kept, target, rejected=rejected)
    if args.annotations is None:
        raise ShardError(f"--kind {args.kind} needs --annotations (label-map directory or COCO JSON)")
    if args.kind == SEGMENTATION:
        if args.class_names is None:
            raise ShardError("--kind segmentation needs --class-names FILE")
        names = read_class_names(args.class_names)
        spec = DenseSpec(SEGMENTATION, len(names), args.reduce_zero_label)
        return Inputs(segmentation_items(args.source, args.annotations), {n: i for i, n in enumerate(names)}, spec)
    items, classes, category_ids = coco_items(args.annotations, args.source)
    return Inputs(items, classes, DenseSpec(DETECTION, len(classes), category_ids=tuple(category_ids)))


def shard_target(args: argparse.Namespace) -> tuple[int, int]:
    """(target shard bytes, shard count) of the command line: one of ``--shard-size`` and ``--num-shards``."""
    if args.shard_size is not None and args.num_shards is not None:
        raise ShardError("--shard-size and --num-shards both given: give one (a size per shard, or a shard count)")
    if args.num_shards is not None and args.num_shards < 1:
        raise ShardError(f"--num-shards {args.num_shards}: give a count >= 1")
    if args.shard_size is not None and args.shard_size <= 0:
        raise ShardError(f"--shard-size {args.shard_size:g}: give a size > 0 (MiB)")
    return int((args.shard_size or DEFAULT_SHARD_MIB) * (1 << 20)), args.num_shards or 0


def main(args: argparse.Namespace) -> int:
    target_bytes, num_shards = shard_target(args)
    inputs = list_inputs(args)
    options = PreprocessOptions(args.max_short_side, args.quality, args.reencode_all)
    manifest = write_shards(shuffled(inputs.items, args.seed), args.out, inputs.classes, str(args.source), options,
                            target_shard_bytes=target_bytes, num_shards=num_shards, num_workers=args.workers,
                            progress=not args.quiet, spec=inputs.spec, rejected=inputs.rejected)
    total = len(manifest) + manifest.num_bad
    print(f"{len(manifest)} samples in {len(manifest.shards)} shards, {manifest.num_classes} classes ({manifest.kind}), "
          f"{manifest.num_bad} bad ({args.out / manifest.bad_report}) -> {args.out}")
    if manifest.num_bad > args.max_bad_fraction * total:
        raise ShardError(f"{manifest.num_bad} of {total} inputs are bad, more than --max-bad-fraction "
                         f"{args.max_bad_fraction}; see {args.out / manifest.bad_report} (fix or remove them, or "
                         "raise --max-bad-fraction)")
    return 0
