"""Dense annotations in shards: segmentation label maps (PNG) and detection instance records (JSON).

Shard kinds (``Manifest.kind``) and the member that sits next to each sample's ``KEY.jpg``:

* ``classification``: ``KEY.cls``, the class id as ASCII digits.
* ``segmentation``: ``KEY.png``, an 8-bit single-channel label map of the image's size. Raw values are
  the dataset's own: ADE20K's 0 = "other" and 1..K = classes, read with ``reduce_zero_label`` (0 -> ignore,
  v -> v - 1) into training ids 0..K-1; without it the raw values are the training ids 0..K-1. 255 is the
  ignore index in both. ``label_lut`` maps raw values to training ids.
* ``detection``: ``KEY.json``, one image's instances (:func:`check_instances` writes it)::

      {"image_id": 7, "file_name": "a.jpg", "width": W, "height": H,
       "instances": [{"id": 12, "bbox": [x, y, w, h], "category_id": 18, "label": 3, "iscrowd": 0,
                      "segmentation": <COCO polygons or RLE>, "area": 812.0}]}

  ``bbox`` in pixels (COCO's xywh, clamped into the image), ``category_id`` the file's own id and ``label``
  the training id 1..K (categories in ascending id order; 0 is the detector's background).

make-shards validates every sample against its image (``check_label_map``, ``check_instances``); a sample
that fails raises :class:`BadAnnotation`, which the writer records in ``bad_files.tsv`` like an
undecodable image (a counted skip; ``--max-bad-fraction`` turns too many into an error).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from itpn_ds.data.preprocess import BadImage

CLASSIFICATION, SEGMENTATION, DETECTION = "classification", "segmentation", "detection"
KINDS = (CLASSIFICATION, SEGMENTATION, DETECTION)
ANNOTATION_EXT = {CLASSIFICATION: "cls", SEGMENTATION: "png", DETECTION: "json"}
IGNORE_INDEX = 255
BOX_TOLERANCE = 1.0  # px a box may reach past the image border (rounding in the annotation tools); clamped


class BadAnnotation(BadImage):
    """A sample whose annotation does not fit its image or the class list (a counted skip, like BadImage)."""


@dataclass(frozen=True)
class DenseSpec:
    """What a dense shard's annotations must satisfy.

    kind:              ``segmentation`` or ``detection``.
    num_classes:       training classes K (segmentation: ids 0..K-1; detection: labels 1..K).
    reduce_zero_label: segmentation: raw 0 is "other" (ignored), raw v is class v - 1 (ADE20K).
    ignore_index:      segmentation: the raw and training value of ignored pixels.
    category_ids:      detection: the annotation file's category id of each label 1..K, ascending.
    """

    kind: str
    num_classes: int
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX
    category_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (SEGMENTATION, DETECTION):
            raise ValueError(f"dense kind must be {SEGMENTATION!r} or {DETECTION!r}, got {self.kind!r}")
        limit = self.ignore_index - int(self.reduce_zero_label)
        if not 1 <= self.num_classes <= limit:
            raise ValueError(f"{self.kind}: num_classes must be in 1..{limit}, got {self.num_classes}")
        if self.kind == DETECTION and len(self.category_ids) != self.num_classes:
            raise ValueError(f"detection: {len(self.category_ids)} category ids for {self.num_classes} classes")

    def valid_raw_values(self) -> np.ndarray:
        """(256,) bool: the raw label-map values a segmentation sample may hold."""
        valid = np.zeros(256, dtype=bool)
        valid[: self.num_classes + int(self.reduce_zero_label)] = True
        valid[self.ignore_index] = True
        return valid


def label_lut(num_classes: int, reduce_zero_label: bool, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(256,) uint8: raw label-map value -> training id (0..K-1) or ``ignore_index``."""
    lut = np.full(256, ignore_index, dtype=np.uint8)
    raw = np.arange(num_classes) + int(reduce_zero_label)
    lut[raw] = np.arange(num_classes)
    return lut


# --------------------------------------------------------------------------------------- segmentation

def decode_label_map(data: bytes) -> np.ndarray:
    """(H, W) uint8 raw values of a stored label map (the shards hold mode-L PNGs)."""
    return np.asarray(Image.open(io.BytesIO(data)))


def check_label_map(data: bytes, image_size: tuple[int, int], spec: DenseSpec) -> bytes:
    """The PNG to store for one label map, after checking it against its image's (width, height) and the
    class list. 8-bit gray PNGs are kept byte for byte; palette PNGs and other 8-bit formats are re-encoded
    as gray PNG holding the palette indices (the raw values). Raises BadAnnotation."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types
        raise BadAnnotation(f"label map cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if image.mode not in ("L", "P"):
        raise BadAnnotation(f"label map has mode {image.mode}, expected one 8-bit channel (L or P)")
    if image.size != tuple(image_size):
        raise BadAnnotation(f"label map is {image.width}x{image.height}, its image is "
                            f"{image_size[0]}x{image_size[1]}")
    values = np.unique(np.asarray(image))
    bad = values[~spec.valid_raw_values()[values]]
    if bad.size:
        top = spec.num_classes + int(spec.reduce_zero_label) - 1
        raise BadAnnotation(f"label values {bad[:8].tolist()} outside the class list (valid: 0..{top} and "
                            f"{spec.ignore_index} = ignore; {spec.num_classes} classes"
                            f"{', reduce_zero_label' if spec.reduce_zero_label else ''})")
    if image.format == "PNG" and image.mode == "L":
        return data
    out = io.BytesIO()
    Image.fromarray(np.asarray(image), mode="L").save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------------ detection

def check_instances(record: dict, image_size: tuple[int, int], spec: DenseSpec) -> bytes:
    """The JSON member for one image's instance record (module docstring), after checking it against the
    image's (width, height) and the categories: the record's size must be the image's, every box
    non-degenerate (w, h > 0) and inside the image (``BOX_TOLERANCE`` px; clamped), every category known,
    every mask present (RLE masks of the image's size). Raises BadAnnotation naming the annotation id."""
    width, height = image_size
    if (record.get("width"), record.get("height")) != (width, height):
        raise BadAnnotation(f"annotation says the image is {record.get('width')}x{record.get('height')}, "
                            f"it is {width}x{height}")
    labels = {c: i + 1 for i, c in enumerate(spec.category_ids)}
    instances = []
    for ann in record["instances"]:
        where = f"annotation {ann.get('id')}"
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not (w > 0 and h > 0):
            raise BadAnnotation(f"{where}: degenerate box {ann['bbox']} (width and height must be > 0)")
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
            raise BadAnnotation(f"{where}: box {ann['bbox']} (x, y, w, h) outside the {width}x{height} image")
        x0, y0 = max(x, 0.0), max(y, 0.0)
        box = [x0, y0, min(x + w, width) - x0, min(y + h, height) - y0]
        if ann["category_id"] not in labels:
            raise BadAnnotation(f"{where}: category id {ann['category_id']} is not among the file's categories")
        _check_segmentation(ann.get("segmentation"), width, height, where)
        instances.append({"id": ann.get("id"), "bbox": box, "category_id": ann["category_id"],
                          "label": labels[ann["category_id"]], "iscrowd": int(ann.get("iscrowd", 0)),
                          "segmentation": ann["segmentation"], "area": float(ann.get("area", w * h))})
    return json.dumps({"image_id": record["image_id"], "file_name": record["file_name"], "width": width,
                       "height": height, "instances": instances}).encode()


def _check_segmentation(segmentation, width: int, height: int, where: str) -> None:
    if isinstance(segmentation, list) and segmentation and all(len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
        return
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", [])) != [height, width]:
            raise BadAnnotation(f"{where}: RLE mask of size {segmentation.get('size')}, the image is "
                                f"[{height}, {width}] (height, width)")
        return
    raise BadAnnotation(f"{where}: no mask (segmentation must be COCO polygons or an RLE dict)")


def _mask_api():
    try:
        from pycocotools import mask
    except ImportError as exc:
        raise ImportError("detection masks need pycocotools: pip install 'itpn-ds[dense]'") from exc
    return mask


def instance_masks(instances: list[dict], height: int, width: int) -> np.ndarray:
    """(N, H, W) uint8 binary masks of the instances' COCO segmentations (polygons, RLE or compressed RLE)."""
    mask_api = _mask_api()
    masks = np.zeros((len(instances), height, width), dtype=np.uint8)
    for i, ann in enumerate(instances):
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_api.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
        masks[i] = mask_api.decode(rle)
    return masks


def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of one (H, W) binary mask."""
    rle = _mask_api().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight COCO box [x, y, w, h] (pixel edges) of a non-empty (H, W) binary mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]
