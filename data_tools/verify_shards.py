"""``itpn-ds verify-shards``: check a shard directory against its manifest.

For every shard: the tar exists, its size and sha256 match the manifest, its index parses and lists
exactly the tar's members at the tar's own offsets, in manifest key order, and each ``.cls`` member
holds the manifest's label. Segmentation shards: each ``.png`` label map has its sample's size and only
values of the class list or the ignore index; detection shards: each ``.json`` record has its sample's
size, boxes inside the image and labels that match the manifest's categories. The manifest itself must
list at least one sample and only labels in its class map. Every problem names the file and sample;
exit status 1 when any is found.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

from itpn_ds.data.annotations import (CLASSIFICATION, SEGMENTATION, BadAnnotation, DenseSpec, check_instances,
                                      check_label_map)
from itpn_ds.data.shards import Manifest, ShardError, ShardInfo, read_index, sha256_file


def verify(directory: str | Path, checksums: bool = True) -> list[str]:
    """Problems found in the shard directory (empty list: all good)."""
    directory = Path(directory)
    try:
        manifest = Manifest.load(directory)
    except ShardError as exc:
        return [str(exc)]
    if len(manifest) == 0:
        return [f"{directory}: empty dataset (the manifest lists no samples)"]
    problems, first = [], 0
    spec = None if manifest.kind == CLASSIFICATION else manifest.dense_spec()
    for shard in manifest.shards:
        end = first + shard.num_samples
        labels = manifest.labels[first:end] if spec is None else [None] * shard.num_samples
        expected = list(zip(manifest.keys[first:end], labels, manifest.sizes[first:end]))
        problems += verify_shard(directory, shard, expected, checksums, spec)
        first = end
    return problems


def verify_shard(directory: Path, shard: ShardInfo, expected: list[tuple[str, int | None, tuple[int, int]]],
                 checksums: bool, spec: DenseSpec | None = None) -> list[str]:
    """Problems of one shard; ``expected`` = the manifest's (key, label, size) per sample, in order (label
    None for the dense kinds, whose annotations are checked against ``spec``)."""
    tar_path = directory / shard.tar
    if not tar_path.is_file():
        return [f"{tar_path}: missing shard"]
    size = tar_path.stat().st_size
    if size != shard.bytes:
        return [f"{tar_path}: {size} bytes, the manifest says {shard.bytes} (truncated or replaced)"]
    if checksums and sha256_file(tar_path) != shard.sha256:
        return [f"{tar_path}: sha256 does not match the manifest"]
    try:
        index = read_index(directory / shard.index)
        members = _tar_members(tar_path)
    except (ShardError, tarfile.TarError) as exc:
        return [f"{exc}" if isinstance(exc, ShardError) else f"{tar_path}: unreadable tar: {exc}"]
    index_path = directory / shard.index
    if len(index) != len(expected):
        return [f"{index_path}: {len(index)} samples, the manifest says {len(expected)}"]
    problems = []
    with open(tar_path, "rb") as tar:
        for (key, components), (want_key, label, size) in zip(index, expected):
            if key != want_key:
                problems.append(f"{index_path}: sample {key!r} where the manifest has {want_key!r}")
                continue
            for ext, (offset, length) in components.items():
                if members.get(f"{key}.{ext}") != (offset, length):
                    problems.append(f"{index_path}: {key}.{ext} at ({offset}, {length}) does not match the tar "
                                    f"member {members.get(f'{key}.{ext}')}")
            if "cls" in components:
                tar.seek(components["cls"][0])
                stored = tar.read(components["cls"][1]).decode(errors="replace")
                if stored != str(label):
                    problems.append(f"{tar_path}: {key}.cls holds {stored!r}, the manifest says {label}")
            if spec is not None:
                problems += _annotation_problems(tar, tar_path, key, components, size, spec)
    return problems


def _annotation_problems(tar, tar_path: Path, key: str, components: dict[str, tuple[int, int]],
                         size: tuple[int, int], spec: DenseSpec) -> list[str]:
    """A dense sample's annotation member checked as make-shards checked it (plus stored labels)."""
    ext = "png" if spec.kind == SEGMENTATION else "json"
    if ext not in components:
        return [f"{tar_path}: sample {key!r} has no .{ext} member"]
    tar.seek(components[ext][0])
    data = tar.read(components[ext][1])
    try:
        if spec.kind == SEGMENTATION:
            check_label_map(data, size, spec)
            return []
        record = json.loads(data)
        check_instances(record, size, spec)
    except (BadAnnotation, ValueError, KeyError, TypeError) as exc:
        return [f"{tar_path}: {key}.{ext}: {exc}"]
    labels = {c: i + 1 for i, c in enumerate(spec.category_ids)}
    return [f"{tar_path}: {key}.json: annotation {ann.get('id')} has label {ann.get('label')}, its category "
            f"{ann['category_id']} is label {labels[ann['category_id']]}"
            for ann in record["instances"] if ann.get("label") != labels[ann["category_id"]]]


def _tar_members(path: Path) -> dict[str, tuple[int, int]]:
    """Regular members' (data offset, size) as the tar itself records them."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isreg()}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("shards", type=Path, help="shard directory (make-shards output)")
    parser.add_argument("--no-checksums", action="store_true", help="skip the sha256 check (faster)")


def main(args: argparse.Namespace) -> int:
    problems = verify(args.shards, checksums=not args.no_checksums)
    for problem in problems[1:]:
        print(problem, file=sys.stderr)
    if problems:
        raise ShardError(f"{len(problems)} problem(s) in {args.shards} (the others above), the first: {problems[0]}; "
                         "re-make the damaged shards with `itpn-ds make-shards`")
    manifest = Manifest.load(args.shards)
    print(f"{args.shards}: {len(manifest.shards)} shards, {len(manifest)} samples, {manifest.num_classes} classes "
          f"({manifest.kind}): OK")
    return 0
