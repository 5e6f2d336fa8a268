"""Fine-tuning augmentations whose randomness is a function of (seed, sample key, epoch).

Like the crop views (``views.sample_view``), every random choice is drawn from a generator seeded with
``key_hash(tag, seed, key, epoch)``, so the same sample in the same epoch gets the same augmentation on
any rank, after a resume from a mid-epoch position and on either decoder backend.

* :class:`RandAugment`: ``num_ops`` operations in sequence, each picked uniformly from DALI's standard
  RandAugment suite (``nvidia.dali.auto_aug.rand_augment.get_rand_augment_suite(use_shape=True)``:
  14 ops including ``identity``) at magnitude bin ``magnitude`` of ``num_bins`` (31: bin 9 is timm's
  ``rand-m9``), with a random sign for the signed ops. The per-sample draw (op indices and signs) drives
  DALI's ops in the graph (``core.select`` / ``core.signed_bin``) and the same ops written with PIL for
  the torch backend, with the same magnitude-to-parameter mapping.
* :class:`RandomErasing`: timm's algorithm (probability ``p`` per image; area fraction 0.02-1/3,
  log-uniform aspect 0.3-3.3, up to 10 attempts; the box filled with per-pixel standard normal noise in
  normalized units), applied per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from itpn_ds.data.views import key_hash

FILL = (128, 128, 128)  # DALI's default fill for the geometric ops
MAX_TRANSLATE = 100 / 224  # DALI's default largest shift, as a fraction of the image side


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    """PIL affine warp: output (x, y) samples input (a x + b y + c, d x + e y + f), bilinear, gray fill."""
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR,
                           fillcolor=FILL)


def _posterize(image: Image.Image, bits: float) -> Image.Image:
    return ImageOps.posterize(image, int(min(max(round(bits), 1), 8)))


@dataclass(frozen=True)
class _Op:
    """One RandAugment op: magnitudes ``linspace(low, high, bins)``, negated by the drawn sign when
    ``signed``; ``apply(image, magnitude)`` maps the (signed) magnitude to the op's parameter."""

    low: float
    high: float
    signed: bool
    apply: Callable[[Image.Image, float], Image.Image]


# DALI's get_rand_augment_suite(use_shape=True), in its order; magnitude ranges and parameter maps as there
# (enhance ops take 1 + m; translations are relative to the side; posterize keeps round(m) bits).
RAND_AUGMENT_OPS: dict[str, _Op] = {
    "translate_x": _Op(0, MAX_TRANSLATE, True, lambda im, m: _affine(im, (1, 0, -m * im.width, 0, 1, 0))),
    "translate_y": _Op(0, MAX_TRANSLATE, True, lambda im, m: _affine(im, (1, 0, 0, 0, 1, -m * im.height))),
    "shear_x": _Op(0, 0.3, True, lambda im, m: _affine(im, (1, -m, 0, 0, 1, 0))),
    "shear_y": _Op(0, 0.3, True, lambda im, m: _affine(im, (1, 0, 0, -m, 1, 0))),
    "rotate": _Op(0, 30, True, lambda im, m: im.rotate(m, Image.Resampling.BILINEAR, fillcolor=FILL)),
    "brightness": _Op(0, 0.9, True, lambda im, m: ImageEnhance.Brightness(im).enhance(1 + m)),
    "contrast": _Op(0, 0.9, True, lambda im, m: ImageEnhance.Contrast(im).enhance(1 + m)),
    "color": _Op(0, 0.9, True, lambda im, m: ImageEnhance.Color(im).enhance(1 + m)),
    "sharpness": _Op(0, 0.9, True, lambda im, m: ImageEnhance.Sharpness(im).enhance(1 + m)),
    "posterize": _Op(8, 4, False, _posterize),
    "solarize": _Op(256, 0, False, lambda im, m: ImageOps.solarize(im, m)),
    "equalize": _Op(0, 0, False, lambda im, m: ImageOps.equalize(im)),
    "auto_contrast": _Op(0, 0, False, lambda im, m: ImageOps.autocontrast(im)),
    "identity": _Op(0, 0, False, lambda im, m: im),
}
OP_NAMES = tuple(RAND_AUGMENT_OPS)


@dataclass(frozen=True)
class RandAugment:
    """RandAugment keyed by (seed, key, epoch); a :class:`~itpn_ds.data.view_decoder.SampleAugment`.

    Parameters of a sample (``draw``): int32 array (2, num_ops): row 0 the op indices into ``OP_NAMES``,
    row 1 the signs (1 = negate the magnitude of a signed op)."""

    num_ops: int = 2
    magnitude: int = 9
    num_bins: int = 31

    def __post_init__(self) -> None:
        if self.num_ops < 1:
            raise ValueError(f"RandAugment needs num_ops >= 1, got {self.num_ops}")
        if not 0 <= self.magnitude < self.num_bins:
            raise ValueError(f"magnitude must be in 0..{self.num_bins - 1}, got {self.magnitude}")

    def draw(self, seed: int, key: str, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(key_hash("rand-augment", seed, key, epoch))
        ops = rng.integers(0, len(OP_NAMES), self.num_ops)
        signs = rng.integers(0, 2, self.num_ops)
        return np.stack([ops, signs]).astype(np.int32)

    def magnitude_of(self, name: str, negate: bool) -> float:
        """The signed magnitude op ``name`` applies (before its parameter map)."""
        op = RAND_AUGMENT_OPS[name]
        value = float(np.linspace(op.low, op.high, self.num_bins)[self.magnitude])
        return -value if negate and op.signed else value

    def pil(self, image: Image.Image, params: np.ndarray) -> Image.Image:
        for op_index, negate in np.asarray(params).T:
            name = OP_NAMES[int(op_index)]
            image = RAND_AUGMENT_OPS[name].apply(image, self.magnitude_of(name, bool(negate)))
        return image

    def dali(self, images: Any, params: Any) -> Any:
        from nvidia.dali import types
        from nvidia.dali.auto_aug.core import select, signed_bin

        suite = dali_suite()
        shape = images.shape(dtype=types.FLOAT)  # (H, W, C) per sample, for the translations
        for level in range(self.num_ops):
            images = select(suite, params[0, level], images,
                            magnitude_bin=signed_bin(self.magnitude, random_sign=params[1, level]),
                            num_magnitude_bins=self.num_bins, shape=shape)
        return images


def dali_suite() -> list:
    """DALI's RandAugment suite with relative translations; checked to be the ops of ``OP_NAMES``."""
    from nvidia.dali.auto_aug.rand_augment import get_rand_augment_suite

    suite = get_rand_augment_suite(use_shape=True, max_translate_rel=MAX_TRANSLATE)
    names = tuple(aug.name for aug in suite)
    if names != OP_NAMES:
        raise RuntimeError(f"DALI's RandAugment suite is {names}, this module mirrors {OP_NAMES}")
    return suite


@dataclass(frozen=True)
class RandomErasing:
    """Erase one box per image with probability ``probability``, keyed by (seed, key, epoch).

    area: box area as a fraction of the image; aspect: box height / width (drawn log-uniformly)."""

    probability: float
    area: tuple[float, float] = (0.02, 1 / 3)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)
    attempts: int = 10

    def box(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) in pixels, or None: not erased (probability) or no fitting box found."""
        if rng.random() >= self.probability:
            return None
        log_aspect = (math.log(self.aspect[0]), math.log(self.aspect[1]))
        for _ in range(self.attempts):
            target = rng.uniform(*self.area) * height * width
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if h < height and w < width:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        return None

    def __call__(self, images: torch.Tensor, seed: int, keys: Sequence[str], epoch: int) -> torch.Tensor:
        """Erase in place: images (B, C, H, W) float (normalized), keys (B,); returns ``images``."""
        channels, height, width = images.shape[1:]
        for i, key in enumerate(keys):
            rng = np.random.default_rng(key_hash("erase", seed, key, epoch))
            box = self.box(rng, height, width)
            if box is not None:
                top, left, h, w = box
                _fill(images[i, :, top:top + h, left:left + w], rng.standard_normal((channels, h, w), dtype=np.float32))
        return images


def _fill(region: torch.Tensor, values: np.ndarray) -> None:
    """region[...] = values; on the CPU through numpy, as torch's copy would open an OpenMP region whose
    spinning threads compete with the decoder's for the cores."""
    if region.is_cuda:
        region.copy_(torch.from_numpy(values))
    else:
        region.numpy()[...] = values
