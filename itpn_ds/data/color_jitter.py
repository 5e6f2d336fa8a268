"""Colour jitter of a view: brightness, contrast and saturation factors applied to the decoded box.

The published CLIP pre-training applies torchvision's ``ColorJitter(0.4, 0.4, 0.4)`` to the image before
the crop shared by the student and the teacher view. Here a view carries its three factors
(:class:`JitterFactors`, drawn with the box by ``views.sample_view``); the decoders apply them to the
decoded box before any resize, so every output of the view sees the same jittered pixels, and the teacher
cache stores them next to the box.

A factor of strength ``s`` is drawn uniformly from ``[max(0, 1 - s), 1 + s]`` (torchvision's range). On the
uint8 RGB box ``x``, each op clamps to [0, 255] and rounds (half up) to uint8, as torchvision's ops on a
uint8 image return a uint8 image:

* brightness ``b``: ``b x``;
* contrast ``c``: ``m + c (x - m)``, ``m`` the mean over the box of the grayscale ``0.299 R + 0.587 G +
  0.114 B`` (torchvision takes the mean of the image it is given; we jitter the box, so it is the box's);
* saturation ``s``: ``g + s (x - g)``, ``g`` the pixel's grayscale.

The order is fixed: brightness, contrast, saturation (docs/data.md says why). :func:`jitter_dali` builds
the ops into a DALI graph (CPU or GPU), :func:`jitter_pil` applies them with PIL's ``ImageEnhance``, the
ops torchvision runs on PIL images (which truncate instead of rounding: within one level per op).
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's "L" conversion and torchvision's grayscale


def check_strength(strength: float, name: str = "colour-jitter strength") -> None:
    """``ValueError`` naming ``name`` unless 0 <= strength < 1 (0: no jitter)."""
    if not 0 <= strength < 1:
        raise ValueError(f"{name} must be in [0, 1) (0: off), got {strength}")


@dataclass(frozen=True)
class JitterFactors:
    """One view's brightness, contrast and saturation factors (1.0: unchanged). Values are float32-exact,
    so the cache's float32 column and DALI's float32 arguments hold exactly these numbers."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    @classmethod
    def draw(cls, rng: np.random.Generator, strength: float) -> "JitterFactors":
        """Three factors uniform in ``[max(0, 1 - strength), 1 + strength]``; strength 0 draws nothing."""
        check_strength(strength)
        if strength == 0:
            return cls()
        drawn = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, 3).astype(np.float32)
        return cls(*(float(v) for v in drawn))

    def as_array(self) -> np.ndarray:
        """(3,) float32: brightness, contrast, saturation."""
        return np.array(astuple(self), dtype=np.float32)

    @property
    def is_identity(self) -> bool:
        return self == NO_JITTER


NO_JITTER = JitterFactors()


def jitter_dali(images: Any, factors: Any) -> Any:
    """DALI graph: uint8 HWC images node (CPU or GPU), factors node ((3,) float32 per sample: brightness,
    contrast, saturation) -> the jittered uint8 HWC node.

    ``brightness`` and ``contrast`` are DALI's uint8 ops (they clamp and round); the contrast centre is the
    per-sample mean grayscale of the brightened box, a reduction in the graph (an argument input, so on
    the GPU it is copied to the host: one small device-to-host copy per batch). ``saturation`` runs in
    float and is cast (clamped, rounded) to uint8 once, which on the CPU is faster than the op's own uint8
    output (docs/benchmarks.md)."""
    from nvidia.dali import fn, types

    brightened = fn.brightness(images, brightness=factors[0])
    channel_mean = fn.reductions.mean(brightened, axes=[0, 1], dtype=types.FLOAT)  # (3,) per sample
    red, green, blue = GRAY_WEIGHTS
    gray_mean = red * channel_mean[0] + green * channel_mean[1] + blue * channel_mean[2]
    center = gray_mean.cpu() if gray_mean.device == "gpu" else gray_mean
    contrasted = fn.contrast(brightened, contrast=factors[1], contrast_center=center)
    saturated = fn.saturation(contrasted, saturation=factors[2], dtype=types.FLOAT)
    return fn.cast(saturated, dtype=types.UINT8)


def jitter_pil(image: Image.Image, factors: JitterFactors) -> Image.Image:
    """The same ops, in the same order, on one PIL RGB image (``ImageEnhance``: Brightness, Contrast,
    Color)."""
    image = ImageEnhance.Brightness(image).enhance(factors.brightness)
    image = ImageEnhance.Contrast(image).enhance(factors.contrast)
    return ImageEnhance.Color(image).enhance(factors.saturation)
