"""PyTorch fallback decoding (PIL) behind the same loaders, for machines without DALI.

:class:`PILViewDecoder` has :class:`~itpn_ds.data.view_decoder.ViewDecoder`'s ``decode`` signature, so
the pre-training, fine-tuning and evaluation loaders run unchanged with ``backend="torch"``: the same
epoch order, views, masks, state and corrupt-sample handling; only the pixels come from PIL (decode the
whole image, crop the box, flip, resize). A thread pool of ``num_threads`` decodes a batch in
parallel (PIL releases the GIL while decoding and resizing).
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from itpn_ds.data.view_decoder import ViewOutput
from itpn_ds.data.views import CropView

PIL_INTERPOLATIONS = {"linear": Image.Resampling.BILINEAR, "cubic": Image.Resampling.BICUBIC,
                      "lanczos": Image.Resampling.LANCZOS, "triangular": Image.Resampling.BILINEAR,
                      "nn": Image.Resampling.NEAREST}


class PILDecodeError(RuntimeError):
    """A JPEG PIL cannot decode (a RuntimeError, like DALI's decode failures)."""


class PILViewDecoder:
    """decode(encoded, views) -> one (B, 3, S, S) float32 tensor per output, normalized like ViewDecoder's.

    augment: optional PIL image -> PIL image function applied to the FIRST output (e.g. timm RandAugment).
    """

    def __init__(self, outputs: Sequence[tuple[int, str] | ViewOutput], batch_size: int = 32, num_threads: int = 2,
                 augment: Callable[[Image.Image], Image.Image] | None = None, **_: Any) -> None:
        self.outputs = [o if isinstance(o, ViewOutput) else ViewOutput(*o) for o in outputs]
        self.batch_size = batch_size
        self.augment = augment
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads))

    def _one(self, data: bytes, view: CropView) -> list[torch.Tensor]:
        try:
            image = Image.open(io.BytesIO(bytes(data))).convert("RGB")
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise PILDecodeError(f"cannot decode: {exc}") from exc
        box = image.crop((view.x, view.y, view.x + view.w, view.y + view.h))
        if view.flip:
            box = box.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        outs = [box.resize((o.size, o.size), PIL_INTERPOLATIONS[o.interp]) for o in self.outputs]
        if self.augment is not None:
            outs[0] = self.augment(outs[0])
        return [_normalized(np.array(image), o) for image, o in zip(outs, self.outputs)]

    def decode(self, encoded: Sequence[np.ndarray | bytes], views: Sequence[CropView]) -> list[torch.Tensor]:
        if len(encoded) != len(views):
            raise ValueError(f"{len(encoded)} images but {len(views)} views")
        if not 0 < len(encoded) <= self.batch_size:
            raise ValueError(f"batch of {len(encoded)} images, the decoder takes 1..{self.batch_size}")
        per_sample = list(self._pool.map(self._one, encoded, views))
        return [torch.stack([s[k] for s in per_sample]) for k in range(len(self.outputs))]


def _normalized(pixels: np.ndarray, output: ViewOutput) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32: [0, 1], then (x - mean) / std where the output has them."""
    image = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
    if output.mean is not None:
        image = (image - torch.tensor(output.mean).view(3, 1, 1)) / torch.tensor(output.std).view(3, 1, 1)
    return image.contiguous()


def rand_augment_pil(num_ops: int, magnitude: int) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment (``rand-m{magnitude}-n{num_ops}``) on PIL images."""
    from timm.data.auto_augment import rand_augment_transform

    return rand_augment_transform(f"rand-m{magnitude}-n{num_ops}", {"translate_const": 100,
                                                                    "img_mean": (124, 116, 104)})
