"""Input listings for dense ``make-shards`` kinds: ADE20K-style image/label-map trees and COCO instances JSON.

* Segmentation: ``images/**/NAME.jpg`` with ``annotations/**/NAME.png`` at the same relative path (the
  ADE20K layout, ``ADEChallengeData2016/{images,annotations}/training``), and a class-names file (one
  name per line in training-id order; with ``reduce_zero_label`` the first line names raw label 1).
* Detection: a COCO ``instances_*.json`` (images, annotations, categories) and the directory its
  ``file_name`` entries are relative to. Categories in ascending id order become labels 1..K.

Structural problems of the listing (an image without its label map, an annotation naming an image id the
file does not list, a malformed file) raise ShardError naming the file; per-sample problems (sizes,
values, boxes, a listed image missing on disk) are found while writing and recorded in bad_files.tsv.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from itpn_ds.data.shards import ShardError, SourceItem, sanitize_key
from itpn_ds.data.sources import IMAGE_SUFFIXES


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one per non-empty line, in training-id order."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: class-names file not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ShardError(f"{path}: no class names")
    if len(set(names)) != len(names):
        raise ShardError(f"{path}: class names repeat")
    return names


def segmentation_items(images: str | Path, annotations: str | Path) -> list[SourceItem]:
    """One item per image under ``images`` (sorted), its label map ``annotations/<same path>.png``."""
    images, annotations = Path(images), Path(annotations)
    for root in (images, annotations):
        if not root.is_dir():
            raise ShardError(f"{root}: directory not found")
    items = []
    for path in sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        relative = path.relative_to(images)
        label_map = annotations / relative.with_suffix(".png")
        if not label_map.is_file():
            raise ShardError(f"{path}: no label map (expected {label_map})")
        items.append(SourceItem(str(path), sanitize_key(str(relative)), 0, str(label_map)))
    if not items:
        raise ShardError(f"{images}: no images found")
    return items


def coco_items(annotation_file: str | Path, images: str | Path) -> tuple[list[SourceItem], dict[str, int], list[int]]:
    """Items of a COCO instances file (one per listed image, with its annotations), the class map
    (category name -> label 1..K, categories by ascending id) and the category id of each label."""
    annotation_file, images = Path(annotation_file), Path(images)
    if not annotation_file.is_file():
        raise ShardError(f"{annotation_file}: annotation file not found")
    try:
        coco = json.loads(annotation_file.read_text())
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        listed = {image["id"]: image for image in coco["images"]}
        annotations = coco["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ShardError(f"{annotation_file}: not a COCO instances file: {type(exc).__name__}: {exc}") from exc
    names = [c["name"] for c in categories]
    if not names or len(set(names)) != len(names):
        raise ShardError(f"{annotation_file}: categories must be non-empty with distinct names")
    per_image = defaultdict(list)
    for ann in annotations:
        if ann.get("image_id") not in listed:
            raise ShardError(f"{annotation_file}: annotation {ann.get('id')} names image id {ann.get('image_id')}, "
                             "which the file's images do not list")
        per_image[ann["image_id"]].append(ann)
    items = []
    for image_id in sorted(listed):
        image = listed[image_id]
        record = {"image_id": image_id, "file_name": image["file_name"], "width": image.get("width"),
                  "height": image.get("height"), "annotation_file": str(annotation_file),
                  "instances": per_image[image_id]}
        items.append(SourceItem(str(images / image["file_name"]), sanitize_key(image["file_name"]), 0,
                                json.dumps(record)))
    if not items:
        raise ShardError(f"{annotation_file}: lists no images")
    return items, {name: i + 1 for i, name in enumerate(names)}, [c["id"] for c in categories]
