"""PyTorch fallback decoding (PIL) behind the same loaders, for machines without DALI.

:class:`PILViewDecoder` has :class:`~itpn_ds.data.view_decoder.ViewDecoder`'s ``decode`` signature, so
the pre-training, fine-tuning and evaluation loaders run unchanged with ``backend="torch"``: the same
epoch order, views, masks, augmentation draws, state and corrupt-sample handling; only the pixels come
from PIL (decode the whole image, crop the box, colour-jitter it, resize, augment, flip). A thread pool of
``num_threads`` decodes a batch in parallel (PIL releases the GIL while decoding and resizing).
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from itpn_ds.data.color_jitter import jitter_pil
from itpn_ds.data.view_decoder import SampleAugment, ViewOutput, check_decode_args
from itpn_ds.data.views import CropView
from itpn_ds.errors import UserError

PIL_INTERPOLATIONS = {"linear": Image.Resampling.BILINEAR, "cubic": Image.Resampling.BICUBIC,
                      "lanczos": Image.Resampling.LANCZOS, "triangular": Image.Resampling.BILINEAR,
                      "nn": Image.Resampling.NEAREST}


class PILDecodeError(UserError, RuntimeError):
    """A JPEG PIL cannot decode (a RuntimeError, like DALI's decode failures)."""


class PILViewDecoder:
    """decode(encoded, views) -> one (B, 3, S, S) float32 tensor per output, normalized like ViewDecoder's.

    augment: optional :class:`SampleAugment` applied (``augment.pil``) to the FIRST output after its resize.
    color_jitter: apply each view's jitter factors to the cropped box before the resizes (``jitter_pil``).
    """

    def __init__(self, outputs: Sequence[tuple[int, str] | ViewOutput], batch_size: int = 32, num_threads: int = 2,
                 augment: SampleAugment | None = None, color_jitter: bool = False, **_: Any) -> None:
        self.outputs = [o if isinstance(o, ViewOutput) else ViewOutput(*o) for o in outputs]
        self.batch_size = batch_size
        self.augment = augment
        self.color_jitter = color_jitter
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads))

    def _one(self, data: bytes, view: CropView, params: np.ndarray | None) -> list[torch.Tensor]:
        try:
            image = Image.open(io.BytesIO(bytes(data))).convert("RGB")
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise PILDecodeError(f"cannot decode: {exc}") from exc
        box = image.crop((view.x, view.y, view.x + view.w, view.y + view.h))
        if self.color_jitter:
            box = jitter_pil(box, view.jitter)
        outs = [box.resize((o.size, o.size), PIL_INTERPOLATIONS[o.interp]) for o in self.outputs]
        if self.augment is not None:
            outs[0] = self.augment.pil(outs[0], params)
        if view.flip:
            outs = [out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for out in outs]
        return [_normalized(np.array(image), o) for image, o in zip(outs, self.outputs)]

    def decode(self, encoded: Sequence[np.ndarray | bytes], views: Sequence[CropView],
               params: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]:
        """As :meth:`ViewDecoder.decode <itpn_ds.data.view_decoder.ViewDecoder.decode>`."""
        check_decode_args(encoded, views, params, self.batch_size, self.augment, self.color_jitter)
        per_sample_params = params if params is not None else [None] * len(views)
        per_sample = list(self._pool.map(self._one, encoded, views, per_sample_params))
        return [torch.stack([s[k] for s in per_sample]) for k in range(len(self.outputs))]


def _normalized(pixels: np.ndarray, output: ViewOutput) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32: [0, 1], then (x - mean) / std where the output has them."""
    image = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
    if output.mean is not None:
        image = (image - torch.tensor(output.mean).view(3, 1, 1)) / torch.tensor(output.std).view(3, 1, 1)
    return image.contiguous()

