"""Preprocessing keeps the picture: every input mode is stored as the RGB a viewer shows, compared with
PIL's own conversions of the same input (16-bit greyscale, palette with and without transparency, CMYK,
alpha, EXIF-rotated), after one JPEG round trip (mean error below 6 of 255: JPEG chroma subsampling at sharp edges)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from itpn_ds.data.preprocess import PreprocessOptions, prepare_image
from itpn_ds.errors import UserError

OPTIONS = PreprocessOptions(quality=100)


def gradient(width: int = 48, height: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 with distinct rows, columns and channels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)],
                    axis=-1).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def stored(data: bytes) -> np.ndarray:
    jpeg, width, height = prepare_image(data, OPTIONS)
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (width, height)
    return np.asarray(image, dtype=np.float32)


def on_white(rgba: Image.Image) -> np.ndarray:
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba.convert("RGBA"))
                      .convert("RGB"), dtype=np.float32)


def assert_close(got: np.ndarray, want: np.ndarray, tol: float = 6.0) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < tol, np.abs(got - want).mean()


def test_16_bit_greyscale_png_keeps_its_tones():
    grey16 = (gradient()[..., 0].astype(np.uint16) * 257)  # full 16-bit range
    data = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    want = np.repeat((grey16 >> 8).astype(np.float32)[..., None], 3, axis=-1)
    assert_close(stored(data), want)
    assert stored(data).mean() < 200  # PIL's convert("RGB") clips it to near-white


def test_palette_images_with_and_without_transparency():
    rgb = Image.fromarray(gradient())
    palette = rgb.quantize(64)
    assert_close(stored(encode(palette, "PNG")), np.asarray(palette.convert("RGB"), dtype=np.float32))
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    data = encode(transparent, "PNG", transparency=0)
    assert_close(stored(data), on_white(Image.open(io.BytesIO(data))))


def test_alpha_is_composited_on_white():
    rgba = np.dstack([gradient(), np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (32, 1))])
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    assert_close(stored(data), on_white(Image.open(io.BytesIO(data))))


def test_cmyk_jpeg_is_stored_as_pils_rgb():
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=100)
    assert_close(stored(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32))


@pytest.mark.parametrize("orientation, transpose", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
                                                    (8, Image.Transpose.ROTATE_90)])
def test_exif_rotation_is_applied(orientation, transpose):
    image = Image.fromarray(gradient())
    exif = image.getexif()
    exif[0x0112] = orientation
    data = encode(image, "JPEG", quality=100, exif=exif)
    got = stored(data)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").transpose(transpose), dtype=np.float32)
    assert got.shape[:2] == ((32, 48) if orientation == 3 else (48, 32))  # 6 and 8 turn by 90 degrees
    assert_close(got, want)


def test_out_of_range_options_are_user_errors():
    with pytest.raises(UserError, match="--quality"):
        PreprocessOptions(quality=0)
    with pytest.raises(UserError, match="--max-short-side"):
        PreprocessOptions(max_short_side=-1)
