"""Per-image preprocessing for shards: decode check, EXIF orientation, RGB JPEG, optional shorter-side cap.

Every image is fully decoded once (so truncated and undecodable files are caught here, not during
training). An RGB baseline JPEG without an EXIF rotation that needs no resizing is stored byte for
byte; anything else (PNG, CMYK, grayscale, palette, rotated, over the size cap, other formats) is
re-encoded as an RGB JPEG at the given quality.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from itpn_ds.errors import UserError

EXIF_ORIENTATION = 0x0112


class BadImage(ValueError):
    """An input file that cannot become a training sample (empty, truncated, undecodable)."""


@dataclass(frozen=True)
class PreprocessOptions:
    """max_short_side: cap of the shorter side in px after preprocessing (0 = keep the size).
    quality: JPEG quality of re-encoded images. reencode_all: re-encode even clean RGB JPEGs."""

    max_short_side: int = 0
    quality: int = 90
    reencode_all: bool = False

    def __post_init__(self) -> None:
        if self.max_short_side < 0:
            raise UserError(f"--max-short-side must be >= 0 (0 = no cap), got {self.max_short_side}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality (JPEG quality) must be in 1..100, got {self.quality}")


def prepare_image(data: bytes, options: PreprocessOptions) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of one input file after preprocessing; raises BadImage."""
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        source_format = image.format
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        image.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadImage(f"cannot decode: {type(exc).__name__}: {exc}") from exc
    target = _capped_size(image.size, options.max_short_side)
    keep_bytes = (source_format == "JPEG" and image.mode == "RGB" and orientation == 1
                  and target == image.size and not options.reencode_all)
    if keep_bytes:
        return data, image.width, image.height
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise BadImage(f"bad EXIF orientation: {exc}") from exc
    image = _to_rgb(image)
    target = _capped_size(image.size, options.max_short_side)
    if target != image.size:
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=options.quality)
    return out.getvalue(), image.width, image.height


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode, as a viewer shows it: transparent pixels composited on white, 16- and 32-bit
    greyscale scaled to 8 bits by their bit depth (PIL's own ``convert`` clips them, so a 16-bit PNG would
    turn near-white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        return _high_depth_grey_to_8bit(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_depth_grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``) or 32-bit integer (``I``) greyscale -> ``L``: the top 8 of 16 bits (a 32-bit image
    whose values fit 16 bits, as PNG decoders give, is treated as 16-bit)."""
    values = np.asarray(image).astype(np.int64)
    bits = 16 if image.mode.startswith("I;16") or values.max(initial=0) <= 0xFFFF else 32
    scaled = np.clip(values, 0, (1 << bits) - 1) >> (bits - 8)
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _capped_size(size: tuple[int, int], max_short_side: int) -> tuple[int, int]:
    width, height = size
    short = min(width, height)
    if max_short_side <= 0 or short <= max_short_side:
        return width, height
    scale = max_short_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))
