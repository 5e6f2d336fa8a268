"""Input listings for ``make-shards``: an ImageFolder tree or a CSV/TSV table of (path, label)."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from itpn_ds.data.shards import ShardError, SourceItem, sanitize_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_folder_items(root: str | Path) -> tuple[list[SourceItem], dict[str, int]]:
    """Items of ``root/<class>/**/<image>`` (sorted) and the class map (sorted class names -> 0..C-1).
    Files are matched by suffix only; a broken file in the tree is reported later, not skipped here."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: image folder not found")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = {d.name: i for i, d in enumerate(class_dirs)}
    items = [SourceItem(str(path), sanitize_key(str(path.relative_to(root))), classes[d.name])
             for d in class_dirs for path in sorted(d.rglob("*"))
             if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ShardError(f"{root}: no images found under class sub-directories")
    empty = sorted(set(classes) - {class_dirs[item.label].name for item in items})
    if empty:
        raise ShardError(f"{root / empty[0]}: class folder without images ({len(empty)} such: "
                         f"{', '.join(empty[:5])}): add its images or remove the folder")
    return items, classes


def table_items(table: str | Path) -> tuple[list[SourceItem], dict[str, int]]:
    """Items of a CSV (``,``) or TSV (``.tsv``: tab) file with rows ``path,label``; an optional header
    row ``path,label`` is skipped; relative paths are relative to the table's directory. Labels are class
    names (ids in sorted order) or, when every label is an integer, the class ids themselves."""
    table = Path(table)
    if not table.is_file():
        raise ShardError(f"{table}: table not found")
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    with open(table, newline="") as f:
        rows = [row for row in csv.reader(f, delimiter=delimiter) if row]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    for number, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise ShardError(f"{table}: row {number} {row!r} needs two columns (path, label)")
    if not rows:
        raise ShardError(f"{table}: no rows")
    names = [row[1].strip() for row in rows]
    if all(n.lstrip("-").isdigit() for n in names):
        ids = sorted({int(n) for n in names})
        if ids[0] < 0:
            raise ShardError(f"{table}: negative class id {ids[0]}")
        classes = {str(i): i for i in ids}
    else:
        classes = {name: i for i, name in enumerate(sorted(set(names)))}
    items = []
    for row, name in zip(rows, names):
        path = Path(row[0].strip())
        path = path if path.is_absolute() else table.parent / path
        items.append(SourceItem(str(path), sanitize_key(row[0].strip().lstrip("/")), classes[name]))
    return items, classes


def renumber(items: list[SourceItem], classes: dict[str, int], target: dict[str, int], target_name: str
             ) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """``items`` (labelled by ``classes``) relabelled by class name as ``target`` numbers them, and the
    (path, reason) of each item whose class ``target`` lacks: bad inputs, counted like undecodable files."""
    name_of = {label: name for name, label in classes.items()}
    kept, rejected = [], []
    for item in items:
        name = name_of[item.label]
        if name in target:
            kept.append(replace(item, label=target[name]))
        else:
            rejected.append((item.path, f"class {name!r} is not in the class list of {target_name}"))
    return kept, rejected


def shuffled(items: list[SourceItem], seed: int) -> list[SourceItem]:
    """A seeded permutation of the items, so that every shard holds a mix of classes."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]
