"""Semantic segmentation loaders over segmentation shards: image and label map through the same plan.

Per sample and epoch the host decodes the label map (PNG; raw values -> training ids by the manifest's
``reduce_zero_label``), draws the :class:`~itpn_ds.data.seg_transforms.SegPlan` from (seed, key, epoch)
(rescale, crop with the category check, flip, photometric) and builds the label side of it. The image
follows the same plan in a decoder:

* :class:`SegImageDecoder` (DALI): decode (``mixed`` on the GPU, CPU with ``device_id=None`` otherwise),
  bilinear antialiased resize to the plan's size, slice the crop, photometric ops (``brightness_contrast``
  for brightness and contrast, ``hsv`` for saturation and hue), ``crop_mirror_normalize`` (flip +
  mean/std, CHW float), ``pad`` with 0 at the bottom/right to the crop size (or to the batch's largest
  image for evaluation).
* :class:`PILSegImageDecoder` (``backend="torch"``): the same steps with PIL (bilinear resize) and numpy
  (``photometric_numpy``), on a thread pool.

Loaders (the Loader protocol; order, rank split, ``valid`` padding and exact resume as the other loaders):

* :class:`SegTrainLoader` -> Batch(images (B, 3, h, w), label_maps (B, h, w) int64 with 255 = ignore
  (padding included), keys, valid); (h, w) = ``recipe.crop_size``.
* :class:`SegEvalLoader` -> Batch(images (B, 3, H, W): each image rescaled (keep ratio) to ``scale`` and
  zero-padded at the bottom/right to the batch's largest, image_sizes (B, 2) its (h, w) before padding,
  label_maps (B, H0, W0) at the ORIGINAL resolution padded with 255, label_sizes (B, 2) the original
  (h, w)). Whole-image inference runs on ``images[i, :, :h, :w]``; sliding-window inference (crop 512,
  stride 341 in mmseg) slides over the same region, then both resize the logits to ``label_sizes[i]``
  (bilinear) before the argmax that ``label_maps[i, :H0, :W0]`` scores. Fixed order.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from itpn_ds.data.annotations import SEGMENTATION, decode_label_map, label_lut
from itpn_ds.data.batch import Batch
from itpn_ds.data.shard_loader import BACKENDS, NORMALIZATIONS, CorruptSampleError, EpochLoader, FixedPass
from itpn_ds.data.shards import ShardError
from itpn_ds.data.seg_transforms import (ADE20K_SCALE, SegPlan, SegRecipe, eval_plan, photometric_numpy,
                                         plan_labels, train_plan)
from itpn_ds.data.view_decoder import _to_tensor, resolve_device


class SegImageDecoder:
    """decode(encoded, plans) -> (B, 3, H, W) float32 normalized images, with DALI.

    pad_to: (h, w) every output is padded to (training), or None: the batch's largest (evaluation).
    photometric: build the graph with the photometric ops (they read each plan's factors).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad_to: tuple[int, int] | None,
                 photometric: bool, device: str = "auto", batch_size: int = 8, num_threads: int = 2) -> None:
        self.device = resolve_device(device)
        self.mean, self.std = [255.0 * m for m in mean], [255.0 * s for s in std]
        self.pad_to, self.photometric, self.batch_size = pad_to, photometric, batch_size
        from nvidia.dali import pipeline_def

        device_id = torch.cuda.current_device() if self.device == "gpu" else None
        self._pipe = pipeline_def(self._graph, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                  prefetch_queue_depth=1, exec_dynamic=True)()
        self._pipe.build()

    def _graph(self):
        from nvidia.dali import fn, types

        def source(name: str, dtype=types.FLOAT):
            return fn.external_source(name=name, dtype=dtype)

        encoded = source("encoded", types.UINT8)
        image = fn.decoders.image(encoded, device="mixed" if self.device == "gpu" else "cpu", output_type=types.RGB)
        image = fn.resize(image, resize_x=source("width"), resize_y=source("height"),
                          interp_type=types.INTERP_LINEAR, antialias=True)
        image = fn.slice(image, source("anchor"), source("shape"), axis_names="WH", normalized_anchor=False,
                         normalized_shape=False)
        if self.photometric:
            image = fn.brightness_contrast(image, brightness_shift=source("brightness"))
            image = fn.brightness_contrast(image, brightness=source("contrast_before"))
            image = fn.hsv(image, hue=source("hue"), saturation=source("saturation"))
            image = fn.brightness_contrast(image, brightness=source("contrast_after"))
        image = fn.crop_mirror_normalize(image, mirror=source("flip", types.INT32), dtype=types.FLOAT,
                                         output_layout="CHW", mean=self.mean, std=self.std)
        pad = {} if self.pad_to is None else {"shape": list(self.pad_to)}
        return fn.pad(image, axes=(1, 2), fill_value=0.0, **pad)

    def decode(self, encoded: Sequence[bytes], plans: Sequence[SegPlan]) -> torch.Tensor:
        """Raises RuntimeError (DALI) when a JPEG cannot be decoded."""
        scalar = _float_scalars
        feed = {"encoded": [np.frombuffer(e, dtype=np.uint8) for e in encoded],
                "width": scalar(p.size[0] for p in plans), "height": scalar(p.size[1] for p in plans),
                "anchor": [np.array(p.box[:2], dtype=np.float32) for p in plans],
                "shape": [np.array(p.box[2:], dtype=np.float32) for p in plans],
                "flip": [np.array(int(p.flip), dtype=np.int32) for p in plans]}
        if self.photometric:
            ph = [p.photometric for p in plans]
            feed.update(brightness=scalar(q.brightness / 255.0 for q in ph),
                        contrast_before=scalar(q.contrast if q.contrast_first else 1.0 for q in ph),
                        contrast_after=scalar(1.0 if q.contrast_first else q.contrast for q in ph),
                        hue=scalar(q.hue for q in ph), saturation=scalar(q.saturation for q in ph))
        for name, data in feed.items():
            self._pipe.feed_input(name, data)
        (out,) = self._pipe.run()
        return _to_tensor(out)


def _float_scalars(values) -> list[np.ndarray]:
    """One float32 scalar array per sample (a DALI argument input)."""
    return [np.array(v, dtype=np.float32) for v in values]


class PILSegImageDecoder:
    """:class:`SegImageDecoder`'s steps with PIL and numpy (no DALI), on a thread pool."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad_to: tuple[int, int] | None,
                 photometric: bool, num_threads: int = 2, **_) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.pad_to, self.photometric = pad_to, photometric
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads))

    def _one(self, data: bytes, plan: SegPlan) -> torch.Tensor:
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:  # PIL raises many types
            raise RuntimeError(f"cannot decode: {exc}") from exc
        x, y, w, h = plan.box
        image = image.resize(plan.size, Image.Resampling.BILINEAR).crop((x, y, x + w, y + h))
        pixels = np.asarray(image)
        if self.photometric:
            pixels = photometric_numpy(pixels, plan.photometric)
        if plan.flip:
            pixels = pixels[:, ::-1]
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self.mean) / self.std

    def decode(self, encoded: Sequence[bytes], plans: Sequence[SegPlan]) -> torch.Tensor:
        images = list(self._pool.map(self._one, encoded, plans))
        height, width = self.pad_to or (max(i.shape[1] for i in images), max(i.shape[2] for i in images))
        out = torch.zeros(len(images), 3, height, width)
        for i, image in enumerate(images):
            out[i, :, : image.shape[1], : image.shape[2]] = image
        return out


class _SegLoader(EpochLoader):
    """Shared by the train and eval loaders: the shard kind check, the label LUT and the decoder."""

    def __init__(self, shards: str | Path, micro_batch: int, pad_to: tuple[int, int] | None, photometric: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2, device: str = "auto",
                 backend: str = "dali", normalize: str = "imagenet") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got {normalize!r}")
        super().__init__(shards, micro_batch, rank, world_size, seed)
        if self.manifest.kind != SEGMENTATION:
            raise ShardError(f"{shards}: a {self.manifest.kind} shard directory, the segmentation loader needs "
                             "one written by `make-shards --kind segmentation`")
        self.lut = label_lut(self.manifest.num_classes, self.manifest.reduce_zero_label, self.manifest.ignore_index)
        self.ignore_index = self.manifest.ignore_index
        decoder_cls = SegImageDecoder if backend == "dali" else PILSegImageDecoder
        self.decoder = decoder_cls(*NORMALIZATIONS[normalize], pad_to=pad_to, photometric=photometric, device=device,
                                   batch_size=micro_batch, num_threads=num_threads)

    def labels(self, index: int) -> np.ndarray:
        """(H, W) uint8 training ids of sample ``index`` (ignore index where ignored)."""
        return self.lut[decode_label_map(self.reader.annotation(index))]

    def _decode(self, indices: np.ndarray, plans: list[SegPlan], keys: list[str]) -> torch.Tensor:
        try:
            return self.decoder.decode([self.reader.encoded(int(i)) for i in indices], plans)
        except RuntimeError as exc:
            raise CorruptSampleError(f"{self.reader.directory}: a JPEG of samples {keys} cannot be decoded: {exc}") from exc


class SegTrainLoader(_SegLoader):
    """Training batches of the mmseg ADE20K recipe (``recipe``; crop size, scale, ratio range, ...)."""

    def __init__(self, shards: str | Path, micro_batch: int, recipe: SegRecipe | None = None, **kwargs) -> None:
        recipe = recipe or SegRecipe()
        super().__init__(shards, micro_batch, recipe.crop_size, recipe.photometric, **kwargs)
        self.recipe = recipe

    def plans(self, keys: list[str], labels: list[np.ndarray]) -> list[SegPlan]:
        return [train_plan(self.seed, k, self.epoch, lab, self.recipe, self.ignore_index)
                for k, lab in zip(keys, labels)]

    def _load(self, indices: np.ndarray, valid: np.ndarray) -> Batch:
        keys = [self.manifest.keys[i] for i in indices]
        labels = [self.labels(int(i)) for i in indices]
        plans = self.plans(keys, labels)
        images = self._decode(indices, plans, keys)
        label_maps = torch.from_numpy(np.stack([plan_labels(lab, p, self.recipe.crop_size, self.ignore_index)
                                                for lab, p in zip(labels, plans)]))
        return Batch(images=images, keys=keys, label_maps=label_maps, valid=torch.from_numpy(valid.copy()))


class SegEvalLoader(FixedPass, _SegLoader):
    """Evaluation batches: whole images rescaled (keep ratio) to ``scale``, labels at the original size."""

    def __init__(self, shards: str | Path, micro_batch: int, scale: tuple[int, int] = ADE20K_SCALE, **kwargs) -> None:
        super().__init__(shards, micro_batch, None, False, **kwargs)
        self.scale = scale

    def _load(self, indices: np.ndarray, valid: np.ndarray) -> Batch:
        keys = [self.manifest.keys[i] for i in indices]
        plans = [eval_plan(*self.manifest.sizes[i], self.scale) for i in indices]
        images = self._decode(indices, plans, keys)
        labels = [self.labels(int(i)) for i in indices]
        height, width = max(lab.shape[0] for lab in labels), max(lab.shape[1] for lab in labels)
        label_maps = torch.full((len(labels), height, width), self.ignore_index, dtype=torch.int64)
        for i, lab in enumerate(labels):
            label_maps[i, : lab.shape[0], : lab.shape[1]] = torch.from_numpy(lab.astype(np.int64))
        return Batch(images=images, keys=keys, label_maps=label_maps, valid=torch.from_numpy(valid.copy()),
                     image_sizes=torch.tensor([[p.size[1], p.size[0]] for p in plans], dtype=torch.int64),
                     label_sizes=torch.tensor([lab.shape for lab in labels], dtype=torch.int64))
