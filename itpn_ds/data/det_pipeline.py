"""Detection / instance segmentation loaders over detection shards, in torchvision's detection format.

Torch (PIL) only: each sample's instances are a variable-length record with masks that are decoded from
COCO RLE/polygons on the host anyway, so a DALI graph would only take over the JPEG decode and resize;
the loaders decode, resize and flip on a thread pool of ``num_threads``.

Training (:class:`DetTrainLoader`, mmdet/detectron2's multi-scale recipe): the shorter side drawn from
``recipe.short_sides`` (480, 512, ..., 800), the longer side capped at ``recipe.max_long_side`` (1333),
keep ratio; horizontal flip with p 0.5; both drawn from (seed, key, epoch), so a resumed run replays them.
Crowd instances are dropped. Evaluation (:class:`DetEvalLoader`): shorter side 800 (long <= 1333), no
flip, crowd instances kept (``iscrowd`` 1), fixed order.

Both yield :class:`DetectionBatch`: ``images`` a list of (3, H_i, W_i) float32 RGB in [0, 1] (torchvision's
detection models normalize and batch them themselves; configure their transform not to resize again)
and ``targets`` a list of dicts: ``boxes`` (N, 4) float32 xyxy in the resized image's pixels,
``labels`` (N,) int64 1..K (0 is the background), ``masks`` (N, H_i, W_i) uint8, ``iscrowd`` (N,)
int64, ``image_id`` () int64 (the annotation file's), ``orig_size`` and ``size`` (2,) int64 (h, w)
before and after the resize. The manifest's ``category_ids[label - 1]`` is the file's category id.
Boxes are scaled and flipped geometrically; masks are resized nearest (pixel-centre), so a mask's tight
box stays within 0.5 px of its box (1.5 px where downscaling skips a thin tip of the mask).
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from itpn_ds.data.annotations import DETECTION, instance_masks
from itpn_ds.data.seg_transforms import nearest_index
from itpn_ds.data.shard_loader import CorruptSampleError, EpochLoader, FixedPass
from itpn_ds.data.shards import ShardError
from itpn_ds.data.views import key_hash


@dataclass(frozen=True)
class DetRecipe:
    """short_sides: the shorter sides training draws from; max_long_side: cap of the longer side;
    flip_prob: horizontal flip probability."""

    short_sides: tuple[int, ...] = tuple(range(480, 801, 32))
    max_long_side: int = 1333
    flip_prob: float = 0.5


@dataclass
class DetectionBatch:
    """One micro-batch of detection samples (module docstring); ``valid`` (B,) bool as in Batch."""

    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]
    keys: list[str]
    valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "DetectionBatch":
        return replace(self, images=[i.to(device, non_blocking=non_blocking) for i in self.images],
                       targets=[{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets],
                       valid=self.valid.to(device, non_blocking=non_blocking))


def resized_size(width: int, height: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """(w, h) with the shorter side ``short_side`` unless that makes the longer exceed ``max_long_side``."""
    factor = min(short_side / min(width, height), max_long_side / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


def transform_sample(image: Image.Image, record: dict, size: tuple[int, int], flip: bool,
                     keep_crowd: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One decoded image and its instance record -> (3, h, w) float image in [0, 1] and its target,
    resized to ``size`` (w, h) and optionally flipped."""
    instances = [a for a in record["instances"] if keep_crowd or not a["iscrowd"]]
    width, height = image.size
    masks = instance_masks(instances, height, width)
    rows, cols = nearest_index(height, size[1]), nearest_index(width, size[0])
    masks = masks[:, rows[:, None], cols[None, :]]
    boxes = np.array([a["bbox"] for a in instances], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes *= np.array([size[0] / width, size[1] / height] * 2)
    pixels = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    if flip:
        pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
        boxes[:, [0, 2]] = size[0] - boxes[:, [2, 0]]
    target = {"boxes": torch.from_numpy(boxes.astype(np.float32)),
              "labels": torch.tensor([a["label"] for a in instances], dtype=torch.int64),
              "masks": torch.from_numpy(np.ascontiguousarray(masks)),
              "iscrowd": torch.tensor([a["iscrowd"] for a in instances], dtype=torch.int64),
              "image_id": torch.tensor(record["image_id"], dtype=torch.int64),
              "orig_size": torch.tensor([height, width], dtype=torch.int64),
              "size": torch.tensor([size[1], size[0]], dtype=torch.int64)}
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0), target


class _DetectionLoader(EpochLoader):
    keep_crowd = False  # targets keep crowd instances (evaluation)

    def __init__(self, shards: str | Path, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_threads: int = 2) -> None:
        super().__init__(shards, micro_batch, rank, world_size, seed)
        if self.manifest.kind != DETECTION:
            raise ShardError(f"{shards}: a {self.manifest.kind} shard directory, the detection loader needs one "
                             "written by `make-shards --kind detection`")
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="detection")

    def sample_transform(self, key: str, width: int, height: int) -> tuple[tuple[int, int], bool]:
        """(resized (w, h), flip) of one sample in the current epoch."""
        raise NotImplementedError

    def _one(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key = self.manifest.keys[index]
        try:
            image = Image.open(io.BytesIO(self.reader.encoded(index))).convert("RGB")
        except Exception as exc:  # PIL raises many types
            raise CorruptSampleError(f"sample {key!r} cannot be decoded: {exc}") from exc
        record = json.loads(self.reader.annotation(index))
        size, flip = self.sample_transform(key, *image.size)
        return transform_sample(image, record, size, flip, self.keep_crowd)

    def _load(self, indices: np.ndarray, valid: np.ndarray) -> DetectionBatch:
        images, targets = zip(*self._pool.map(self._one, [int(i) for i in indices]))
        return DetectionBatch(list(images), list(targets), [self.manifest.keys[i] for i in indices],
                              torch.from_numpy(valid.copy()))


class DetTrainLoader(_DetectionLoader):
    """Multi-scale training batches (``recipe``)."""

    def __init__(self, shards: str | Path, micro_batch: int, recipe: DetRecipe = DetRecipe(), **kwargs) -> None:
        super().__init__(shards, micro_batch, **kwargs)
        self.recipe = recipe

    def sample_transform(self, key: str, width: int, height: int) -> tuple[tuple[int, int], bool]:
        rng = np.random.default_rng(key_hash("detection", self.seed, key, self.epoch))
        short = int(self.recipe.short_sides[int(rng.integers(len(self.recipe.short_sides)))])
        flip = bool(rng.random() < self.recipe.flip_prob)
        return resized_size(width, height, short, self.recipe.max_long_side), flip


class DetEvalLoader(FixedPass, _DetectionLoader):
    """Evaluation batches: shorter side ``short_side`` (longer <= ``max_long_side``), crowd kept, fixed order."""

    keep_crowd = True

    def __init__(self, shards: str | Path, micro_batch: int, short_side: int = 800, max_long_side: int = 1333,
                 **kwargs) -> None:
        super().__init__(shards, micro_batch, **kwargs)
        self.short_side, self.max_long_side = short_side, max_long_side

    def sample_transform(self, key: str, width: int, height: int) -> tuple[tuple[int, int], bool]:
        return resized_size(width, height, self.short_side, self.max_long_side), False

