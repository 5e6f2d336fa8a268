"""Fine-tuning augmentations keyed by (seed, key, epoch): RandAugment (DALI and PIL) and random erasing."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from itpn_ds.data import build_finetune_loader
from itpn_ds.data.augment import OP_NAMES, RAND_AUGMENT_OPS, RandAugment, RandomErasing, dali_suite
from itpn_ds.data.shards import ShardReader
from itpn_ds.data.view_decoder import ViewDecoder
from itpn_ds.data.views import sample_view

COMMON = dict(micro_batch=8, num_threads=1, img_size=32, rand_augment_ops=2, rand_augment_magnitude=9, reprob=0.5)


def _dali_rand_augment(augment: RandAugment, images: list[np.ndarray], params: list[np.ndarray]) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, exec_dynamic=True, enable_conditionals=True)
    def graph():
        return augment.dali(fn.external_source(name="images", dtype=types.UINT8, layout="HWC"),
                            fn.external_source(name="params", dtype=types.INT32))

    pipe = graph()
    pipe.build()
    pipe.feed_input("images", images)
    pipe.feed_input("params", params)
    (out,) = pipe.run()
    return [np.asarray(t) for t in out]


def test_pil_ops_mirror_dalis_suite_one_by_one(demo_shards):
    """Each op and sign drives DALI's op and our PIL op to nearly the same pixels (the opposite sign does not)."""
    assert OP_NAMES == tuple(aug.name for aug in dali_suite())
    for aug in dali_suite():
        op = RAND_AUGMENT_OPS[aug.name]
        if aug.mag_range is not None:
            assert (op.low, op.high) == pytest.approx(tuple(aug.mag_range)) and op.signed == aug.randomly_negate
    image = Image.open(io.BytesIO(ShardReader(demo_shards).encoded(0))).convert("RGB").resize((64, 64))
    augment = RandAugment(num_ops=1, magnitude=15)
    params = [np.array([[k], [sign]], dtype=np.int32) for k in range(len(OP_NAMES)) for sign in (0, 1)]
    outs = _dali_rand_augment(augment, [np.asarray(image)] * len(params), params)
    for out, p in zip(outs, params):
        name, dali = OP_NAMES[p[0, 0]], out.astype(np.float32)
        ours = np.asarray(augment.pil(image, p), dtype=np.float32)
        assert np.abs(dali - ours).mean() < (4.0 if name == "equalize" else 1.0), name  # equalize: OpenCV's LUT
        if RAND_AUGMENT_OPS[name].signed:
            flipped = np.asarray(augment.pil(image, np.array([[p[0, 0]], [1 - p[1, 0]]])), dtype=np.float32)
            assert np.abs(dali - flipped).mean() > 2 * np.abs(dali - ours).mean() + 1.0, name


def test_draws_are_keyed_by_seed_key_and_epoch():
    augment = RandAugment(num_ops=2)
    draw = augment.draw(0, "a/b", 3)
    assert draw.dtype == np.int32 and draw.shape == (2, 2)
    assert np.array_equal(draw, augment.draw(0, "a/b", 3))
    keys = [f"k{i}" for i in range(50)]
    assert sum(not np.array_equal(augment.draw(0, k, 3), augment.draw(0, k, 4)) for k in keys) > 40
    assert sum(not np.array_equal(augment.draw(0, k, 3), augment.draw(1, k, 3)) for k in keys) > 40


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_mid_epoch_replays_augmented_pixels_bitwise(demo_shards, backend):
    first = build_finetune_loader(demo_shards, backend=backend, **COMMON)
    first.set_epoch(2)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    expected = list(it)
    resumed = build_finetune_loader(demo_shards, backend=backend, **COMMON)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b.keys for b in rest] == [b.keys for b in expected] and len(rest) == len(expected) > 0
    for a, b in zip(rest, expected):
        assert torch.equal(a.images, b.images)


def test_another_epoch_augments_the_same_box_differently(demo_shards):
    """Same boxes, RandAugment parameters of epoch 1 vs epoch 2: other pixels for (nearly) every sample."""
    reader = ShardReader(demo_shards)
    samples = [reader.sample(i) for i in range(8)]
    views = [sample_view(0, s.key, 0, *s.size) for s in samples]
    augment = RandAugment(num_ops=2, magnitude=15)
    decoder = ViewDecoder([(32, "cubic")], device="cpu", batch_size=8, num_threads=1, augment=augment)
    encoded = [s.data for s in samples]
    epoch1, again, epoch2 = (decoder.decode(encoded, views, [augment.draw(0, s.key, e) for s in samples])[0]
                             for e in (1, 1, 2))
    assert torch.equal(epoch1, again)
    assert ((epoch1 - epoch2).abs().flatten(1).mean(1) > 0.01).sum() >= 6


def test_random_erasing_rate_boxes_noise_and_no_global_rng():
    erasing = RandomErasing(probability=0.25)
    keys = [f"img{i}" for i in range(2000)]
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    images = erasing(torch.zeros(len(keys), 3, 24, 24), seed=0, keys=keys, epoch=0)
    assert torch.equal(states[0], torch.get_rng_state()) and np.array_equal(states[1], np.random.get_state()[1])
    assert states[2] == random.getstate()
    erased = images.flatten(1).ne(0).any(1)
    assert abs(erased.float().mean().item() - 0.25) < 0.03
    area = images[erased].ne(0).any(1).flatten(1).float().mean(1)  # erased fraction of each erased image
    assert area.min() >= 0.015 and area.max() <= 0.36
    noise = images[images.ne(0)]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    again = erasing(torch.zeros(len(keys), 3, 24, 24), seed=0, keys=keys, epoch=0)
    other_epoch = erasing(torch.zeros(len(keys), 3, 24, 24), seed=0, keys=keys, epoch=1)
    assert torch.equal(images, again) and not torch.equal(images, other_epoch)
