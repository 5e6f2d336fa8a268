"""DALI loaders on the demo shards: batch contents, view replay, exactly-once over ranks, resume, corrupt samples."""
from __future__ import annotations

import shutil

import pytest
import torch

from itpn_ds.data import build_eval_loader, build_finetune_loader, build_pretrain_loader
from itpn_ds.data.shard_loader import CorruptSampleError, IMAGENET_MEAN, IMAGENET_STD
from itpn_ds.data.shards import Manifest, ShardReader
from itpn_ds.data.view_decoder import ViewDecoder
from itpn_ds.data.views import CropView, SampledViews

COMMON = dict(micro_batch=8, num_threads=1, device="cpu")


class FixedViews:
    """A ViewSource standing in for a teacher cache: view id 7, a fixed box, targets that encode the key."""

    color_jitter = 0.0

    def views(self, keys, sizes, epoch):
        return [(7, CropView(2, 3, min(w, 60) - 2, min(h, 50) - 3, True)) for w, h in sizes]

    def targets(self, keys, view_ids):
        return torch.tensor([[[float(len(k)), float(v)]] for k, v in zip(keys, view_ids)])


def test_pretrain_batch_replays_the_view_for_student_and_teacher(demo_shards):
    loader = build_pretrain_loader(demo_shards, views=FixedViews(), img_size=32, teacher_resolution=28,
                                   patch_size=8, **COMMON)
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, 32, 32) and batch.teacher_images.shape == (8, 3, 28, 28)
    assert batch.bool_masked_pos.shape == (8, 16) and batch.valid.all()
    assert (batch.view_ids == 7).all() and batch.targets[:, 0, 0].tolist() == [len(k) for k in batch.keys]
    reader = ShardReader(demo_shards)
    data = reader.read(batch.keys[0])
    view = FixedViews().views([batch.keys[0]], [Manifest.load(demo_shards).sizes[reader.index_of(batch.keys[0])]], 0)[0][1]
    student, teacher = ViewDecoder([(32, "cubic"), (28, "lanczos")], device="cpu", num_threads=1).decode([data], [view])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(batch.images[0], (student[0] - mean) / std, atol=1e-5)
    assert torch.allclose(batch.teacher_images[0], teacher[0])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(demo_shards, world):
    loaders = [build_finetune_loader(demo_shards, img_size=16, rank=r, world_size=world, **COMMON) for r in range(world)]
    keys = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader) == len(loaders[0])
        keys += [k for b in batches for k, v in zip(b.keys, b.valid) if v]
    assert sorted(keys) == sorted(Manifest.load(demo_shards).keys)


def test_mid_epoch_resume_continues_with_the_unseen_samples(demo_shards):
    """Resumed mid-epoch: the unseen samples with bitwise the same (colour-jittered) pixels and masks."""
    views = SampledViews(seed=0, color_jitter=0.4)
    loader = build_pretrain_loader(demo_shards, views=views, img_size=16, patch_size=8, **COMMON)
    loader.set_epoch(1)
    it = iter(loader)
    first = [next(it), next(it)]
    state = loader.state_dict()
    resumed = build_pretrain_loader(demo_shards, views=views, img_size=16, patch_size=8, **COMMON)
    resumed.load_state_dict(state)
    rest, expected = list(resumed), list(it)
    assert [b.keys for b in rest] == [b.keys for b in expected]
    assert all(torch.equal(a.bool_masked_pos, b.bool_masked_pos) for a, b in zip(rest, expected))
    assert all(torch.equal(a.images, b.images) for a, b in zip(rest, expected))
    seen = [k for b in first + rest for k, v in zip(b.keys, b.valid) if v]
    assert sorted(seen) == sorted(Manifest.load(demo_shards).keys)


def test_eval_center_crop_order_is_fixed(demo_shards):
    loader = build_eval_loader(demo_shards, img_size=16, crop_pct=0.875, **COMMON)
    once, twice = [b.keys for b in loader], [b.keys for b in loader]
    assert once == twice and sum(len(k) for k in once) == len(loader) * 8


def _corrupt_copy(demo_shards, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(demo_shards, copy)
    reader = ShardReader(copy)
    loc = reader.locations[0]
    tar = copy / reader.manifest.shards[loc.shard].tar
    raw = bytearray(tar.read_bytes())
    raw[loc.offset:loc.offset + loc.size] = b"\x00" * loc.size  # same length, garbage JPEG
    tar.write_bytes(bytes(raw))
    return copy, reader.manifest.keys[0]


def test_corrupt_sample_is_skipped_counted_or_raises(demo_shards, tmp_path, caplog):
    copy, bad_key = _corrupt_copy(demo_shards, tmp_path)
    loader = build_finetune_loader(copy, img_size=16, **COMMON)
    batches = list(loader)
    assert loader.corrupt_count == 1 and bad_key in caplog.text
    flags = {k: bool(v) for b in batches for k, v in zip(b.keys, b.valid)}
    assert flags[bad_key] is False and sum(flags.values()) == len(flags) - 1
    strict = build_finetune_loader(copy, img_size=16, on_corrupt="raise", **COMMON)
    with pytest.raises(CorruptSampleError, match=bad_key):
        list(strict)


def test_finetune_augmentations_change_pixels_but_not_shapes(demo_shards):
    plain = build_finetune_loader(demo_shards, img_size=32, rand_augment_ops=0, reprob=0.0, **COMMON)
    augmented = build_finetune_loader(demo_shards, img_size=32, rand_augment_ops=2, rand_augment_magnitude=15,
                                      reprob=1.0, **COMMON)
    a, b = next(iter(plain)), next(iter(augmented))
    assert a.keys == b.keys and a.images.shape == b.images.shape == (8, 3, 32, 32)
    changed = (a.images - b.images).abs().flatten(1).mean(1)
    assert (changed > 0.05).all()  # every image erased somewhere (reprob=1) and/or RandAugment-ed
    assert a.labels.tolist() == b.labels.tolist()


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "eval"])
def test_torch_backend_gives_the_same_samples_and_nearly_the_same_pixels(demo_shards, kind):
    def build(backend):
        if kind == "pretrain":
            return build_pretrain_loader(demo_shards, views=SampledViews(seed=0, color_jitter=0.4), img_size=32,
                                         patch_size=8, backend=backend, **COMMON)
        if kind == "finetune":
            return build_finetune_loader(demo_shards, img_size=32, rand_augment_ops=0, reprob=0.0, backend=backend,
                                         **COMMON)
        return build_eval_loader(demo_shards, img_size=32, backend=backend, **COMMON)

    dali, torch_ = build("dali"), build("torch")
    assert len(dali) == len(torch_)
    for a, b in zip(dali, torch_):
        assert a.keys == b.keys and torch.equal(a.valid, b.valid)
        assert (a.images - b.images).abs().mean() < 0.05  # normalized units; decoders differ slightly
        if kind == "pretrain":
            assert torch.equal(a.bool_masked_pos, b.bool_masked_pos)


def test_student_normalization_is_the_named_statistics(demo_shards):
    """data.normalize: the same decoded pixels, normalized by ImageNet's or Inception's mean/std."""
    from itpn_ds.data.shard_loader import NORMALIZATIONS

    def first_batch(normalize):
        return next(iter(build_eval_loader(demo_shards, img_size=32, crop_pct=1.0, normalize=normalize, **COMMON)))

    imagenet, inception = first_batch("imagenet"), first_batch("inception")
    assert imagenet.keys == inception.keys
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    pixels = imagenet.images * std + mean
    assert NORMALIZATIONS["inception"] == ((0.5,) * 3, (0.5,) * 3)
    assert torch.allclose(inception.images, (pixels - 0.5) / 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="normalize must be one of"):
        first_batch("bogus")


def test_sampled_views_follow_the_crop_scale():
    """data.crop_scale (pixel pre-training: 0.2-1) bounds every box's area fraction (up to rounding)."""
    views = SampledViews(seed=0, scale=(0.2, 1.0))
    boxes = [view for _, view in views.views([f"k{i}" for i in range(200)], [(300, 200)] * 200, epoch=0)]
    fractions = [v.w * v.h / (300 * 200) for v in boxes]
    assert min(fractions) > 0.19 and max(fractions) <= 1.0
    default = [v for _, v in SampledViews(seed=0).views([f"k{i}" for i in range(200)], [(300, 200)] * 200, 0)]
    assert min(v.w * v.h / (300 * 200) for v in default) < 0.19


@pytest.mark.parametrize("mode", ["roi", "full"])
def test_data_decode_reaches_the_loaders_decoder(demo_shards, mode):
    from itpn_ds.config import load_config
    from itpn_ds.engine.tasks.pretrain import build_pretrain_loader

    cfg = load_config("tiny_pretrain_cpu", [f"data.shards={demo_shards}", "teacher.mode=online",
                                            f"data.decode={mode}", "data.device=cpu"])
    loader = build_pretrain_loader(cfg, rank=0, world_size=1)
    assert loader.decoder.decode_mode == mode
    assert next(iter(loader)).images.shape == (8, 3, 64, 64)
