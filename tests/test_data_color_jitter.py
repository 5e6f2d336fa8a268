"""Colour jitter of a view: keyed factors, DALI against the formula, PIL against DALI, jitter-free default."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itpn_ds.config import ConfigError, DataConfig, load_config
from itpn_ds.data import build_pretrain_loader
from itpn_ds.data.color_jitter import NO_JITTER, JitterFactors
from itpn_ds.data.shards import ShardReader
from itpn_ds.data.torch_loader import PILViewDecoder
from itpn_ds.data.view_decoder import ViewDecoder
from itpn_ds.data.views import CropView, SampledViews, sample_view

STRENGTH = 0.4


def _reference_jitter(box: np.ndarray, factors: JitterFactors) -> np.ndarray:
    """The documented formula, written independently: (H, W, 3) uint8 -> uint8; each op clamps and rounds
    (half up, as DALI)."""
    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(x + 0.5), 0, 255)

    def gray(x: np.ndarray) -> np.ndarray:
        return x @ np.array([0.299, 0.587, 0.114])

    x = to_uint8(box.astype(np.float64) * factors.brightness)
    mean = gray(x).mean()
    x = to_uint8(mean + factors.contrast * (x - mean))
    g = gray(x)[..., None]
    return to_uint8(g + factors.saturation * (x - g)).astype(np.uint8)


def _as_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) float in [0, 1] -> (B, S, S, 3) uint8 levels as float64."""
    return (images.permute(0, 2, 3, 1).double().numpy() * 255).round()


def _square_views(reader: ShardReader, count: int, side: int) -> list[CropView]:
    """Odd-sized square boxes at odd anchors with strongly jittered factors, one per sample."""
    views = []
    for i in range(count):
        w, h = reader.manifest.sizes[i]
        factors = sample_view(1, reader.manifest.keys[i], 0, w, h, color_jitter=STRENGTH).jitter
        views.append(CropView(min(7 + 3 * i, w - side), min(5 + i, h - side), side, side, i % 2 == 1, factors))
    return views


def test_factors_are_keyed_and_leave_box_and_flip_unchanged(demo_shards):
    reader = ShardReader(demo_shards)
    keys, sizes = reader.manifest.keys, reader.manifest.sizes
    for key, (w, h) in zip(keys[:10], sizes[:10]):
        jittered = [sample_view(0, key, v, w, h, color_jitter=STRENGTH) for v in range(3)]
        plain = [sample_view(0, key, v, w, h) for v in range(3)]
        assert jittered == [sample_view(0, key, v, w, h, color_jitter=STRENGTH) for v in range(3)]
        assert [v.box() + (v.flip,) for v in jittered] == [v.box() + (v.flip,) for v in plain]
        assert all(v.jitter == NO_JITTER for v in plain)
        assert len({v.jitter for v in jittered}) == 3  # every view its own factors
        assert sample_view(1, key, 0, w, h, color_jitter=STRENGTH).jitter != jittered[0].jitter
    factors = np.array([sample_view(0, k, 0, w, h, color_jitter=STRENGTH).jitter.as_array()
                        for k, (w, h) in zip(keys, sizes)])
    assert factors.min() >= 1 - STRENGTH and factors.max() <= 1 + STRENGTH
    assert factors.min() < 0.7 and factors.max() > 1.3  # uniform over the range, not a constant
    assert np.array_equal(factors, factors.astype(np.float32))  # float32-exact, as the cache stores them
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        sample_view(0, keys[0], 0, *sizes[0], color_jitter=1.0)


@pytest.mark.parametrize("torch_resize", [True, False])
def test_dali_jitter_follows_the_formula_before_every_resize(demo_shards, torch_resize):
    """A same-size ``nn`` output is the jittered box itself: it matches the numpy formula on the jitter-free
    box within uint8 rounding; a cubic output is the resize of that jittered box (with ``torch_resize`` the
    jitter runs in the decode graph, before torch's resize)."""
    reader = ShardReader(demo_shards)
    side = 37
    views = _square_views(reader, 6, side)
    encoded = [reader.encoded(i) for i in range(6)]
    outputs = [(side, "nn"), (24, "cubic")]
    jittered = ViewDecoder(outputs, device="cpu", batch_size=8, num_threads=1, torch_resize=torch_resize,
                           color_jitter=True).decode(encoded, views)
    plain_views = [CropView(v.x, v.y, v.w, v.h, v.flip) for v in views]
    (plain,) = ViewDecoder([(side, "nn")], device="cpu", batch_size=8, num_threads=1).decode(encoded, plain_views)
    boxes, got = _as_uint8(plain), _as_uint8(jittered[0])
    for i, view in enumerate(views):  # the formula is per pixel + the box mean: the flip commutes with it
        diff = np.abs(got[i] - _reference_jitter(boxes[i].astype(np.uint8), view.jitter))
        assert diff.max() <= 1 and diff.mean() < 0.15, (i, diff.max(), diff.mean())  # DALI's saturation: YIQ
        assert np.abs(got[i] - boxes[i]).mean() > 3  # the factors did change the pixels
    resized = F.interpolate(jittered[0].mul(255).round(), size=(24, 24), mode="bicubic", antialias=True)
    assert (resized.clamp(0, 255).div(255) - jittered[1]).abs().mean() < 0.01


def test_pil_backend_applies_the_same_jitter(demo_shards):
    reader = ShardReader(demo_shards)
    samples = [reader.sample(i) for i in range(8)]
    views = [sample_view(2, s.key, 0, *s.size, color_jitter=STRENGTH) for s in samples]
    plain_views = [CropView(v.x, v.y, v.w, v.h, v.flip) for v in views]
    outputs = [(48, "cubic"), (40, "lanczos")]
    data = [s.data for s in samples]
    dali = ViewDecoder(outputs, device="cpu", batch_size=8, num_threads=1, color_jitter=True).decode(data, views)
    pil = PILViewDecoder(outputs, batch_size=8, num_threads=1, color_jitter=True).decode(data, views)
    pil_plain = PILViewDecoder(outputs, batch_size=8, num_threads=1).decode(data, plain_views)
    for d, p, q in zip(dali, pil, pil_plain):
        backends = (d - p).abs().flatten(1).mean(1)  # [0, 1] units: PIL truncates where DALI rounds
        jitter = (p - q).abs().flatten(1).mean(1)
        assert backends.max() < 0.01, backends
        assert (jitter > 0.01).all() and jitter.mean() > 5 * backends.mean()  # the jitter moved them much more


def test_zero_strength_gives_todays_pixels_and_the_loader_jitters_both_views(demo_shards):
    """color_jitter=0: the loader builds the decoder without the jitter ops, so its pixels are those of the
    jitter-free decoder bitwise. 0.4: student and teacher images are the decode of the jittered views."""
    reader = ShardReader(demo_shards)
    common = dict(micro_batch=8, img_size=32, teacher_resolution=28, patch_size=8, num_threads=1, device="cpu")
    outputs = lambda loader: loader.decoder.outputs  # noqa: E731
    for strength in (0.0, STRENGTH):
        source = SampledViews(seed=0, color_jitter=strength)
        loader = build_pretrain_loader(demo_shards, views=source, **common)
        assert loader.decoder.color_jitter is (strength > 0)
        batch = next(iter(loader))
        views = [v for _, v in source.views(batch.keys, [reader.manifest.sizes[reader.index_of(k)]
                                                          for k in batch.keys], 0)]
        plain_views = [CropView(v.x, v.y, v.w, v.h, v.flip) for v in views]
        encoded = [reader.read(k) for k in batch.keys]
        plain = ViewDecoder(outputs(loader), device="cpu", batch_size=8, num_threads=1).decode(encoded, plain_views)
        if strength == 0:
            assert torch.equal(batch.images, plain[0]) and torch.equal(batch.teacher_images, plain[1])
            continue
        expected = ViewDecoder(outputs(loader), device="cpu", batch_size=8, num_threads=1,
                               color_jitter=True).decode(encoded, views)
        assert torch.equal(batch.images, expected[0]) and torch.equal(batch.teacher_images, expected[1])
        assert (batch.teacher_images - plain[1]).abs().flatten(1).mean(1).min() > 0.005


def test_decoders_refuse_jittered_views_without_the_jitter_ops(demo_shards):
    reader = ShardReader(demo_shards)
    view = CropView(0, 0, 20, 20, False, JitterFactors(1.2, 0.9, 1.1))
    for decoder in (ViewDecoder([(16, "cubic")], device="cpu", batch_size=2, num_threads=1),
                    PILViewDecoder([(16, "cubic")], batch_size=2, num_threads=1)):
        with pytest.raises(ValueError, match="built without color_jitter=True"):
            decoder.decode([reader.encoded(0)], [view])


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_config_refuses_bad_strength(value):
    with pytest.raises(ConfigError, match=r"data.color_jitter must be in \[0, 1\)"):
        load_config(overrides=[f"data.color_jitter={value}"])
    assert DataConfig().color_jitter == 0.4 and load_config(overrides=["data.color_jitter=0"]).data.color_jitter == 0
