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
    """decode(encoded, views) -> one (B, 3, S, S) float32 tensor in [0, 1] per output.

    augment: optional PIL image -> PIL image function applied to the FIRST output (e.g. timm RandAugment).
    """

    def __init__(self, outputs: Sequence[tuple[int, str] | ViewOutput], batch_size: int = 32, num_threads: int = 2,
                 augment: Callable[[Image.Image], Image.Image] | None = None, **_: Any) -> None:
        self.outputs = [o if isinstance(o, ViewOutput) else ViewOutput(*o) for o in outputs]
        self.batch_size = batch_size
        self.augment = augment
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads))

    def _one(self, data: bytes, view: CropView) -> list[np.ndarray]:
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
        return [np.asarray(o) for o in outs]

    def decode(self, encoded: Sequence[np.ndarray | bytes], views: Sequence[CropView]) -> list[torch.Tensor]:
        if len(encoded) != len(views):
            raise ValueError(f"{len(encoded)} images but {len(views)} views")
        if not 0 < len(encoded) <= self.batch_size:
            raise ValueError(f"batch of {len(encoded)} images, the decoder takes 1..{self.batch_size}")
        per_sample = list(self._pool.map(self._one, encoded, views))
        return [torch.from_numpy(np.stack([s[k] for s in per_sample])).permute(0, 3, 1, 2).float().div_(255.0)
                .contiguous() for k in range(len(self.outputs))]


def rand_augment_pil(num_ops: int, magnitude: int) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment (``rand-m{magnitude}-n{num_ops}``) on PIL images."""
    from timm.data.auto_augment import rand_augment_transform

    return rand_augment_transform(f"rand-m{magnitude}-n{num_ops}", {"translate_const": 100,
                                                                    "img_mean": (124, 116, 104)})
