"""The demo's image splits: no held-out image shares a key, pixels or source region with a training image."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from data_tools import demo_images
from data_tools.demo_images import SOURCE_PHOTOS, make_demo_splits
from itpn_ds.data.shards import Manifest, ShardReader, write_shards
from itpn_ds.data.sources import image_folder_items


def shard(folder, out):
    items, classes = image_folder_items(folder)
    write_shards(items, out, classes, str(folder), target_shard_bytes=50_000, progress=False)
    return out


def pixel_hashes(shards):
    return {hashlib.sha256(np.asarray(Image.open(io.BytesIO(s.data)).convert("RGB")).tobytes()).hexdigest()
            for s in ShardReader(shards)}


def test_splits_are_disjoint_by_key_and_pixels_and_hold_every_class(tmp_path):
    splits = make_demo_splits(tmp_path / "images", train_per_class=3, held_out_per_class=2, min_side=64,
                              max_side=96)
    train, held_out = shard(splits.train, tmp_path / "train"), shard(splits.held_out, tmp_path / "held_out")
    train_m, held_out_m = Manifest.load(train), Manifest.load(held_out)
    assert train_m.classes == held_out_m.classes and sorted(train_m.classes) == sorted(SOURCE_PHOTOS)
    every_class = set(range(len(SOURCE_PHOTOS)))
    assert set(train_m.labels) == set(held_out_m.labels) == every_class
    assert (len(train_m), len(held_out_m)) == (3 * len(SOURCE_PHOTOS), 2 * len(SOURCE_PHOTOS))
    assert not set(train_m.keys) & set(held_out_m.keys)
    train_pixels, held_out_pixels = pixel_hashes(train), pixel_hashes(held_out)
    assert len(train_pixels) == len(train_m) and len(held_out_pixels) == len(held_out_m)
    assert not train_pixels & held_out_pixels


def test_held_out_crops_come_only_from_the_right_half_of_each_photo(tmp_path, monkeypatch):
    """A photo red left of the cut and blue right of it (odd width): any crop crossing the cut, or taken
    from the wrong half, would show the other colour."""
    photo = np.zeros((120, 301, 3), np.uint8)
    photo[:, :150, 0] = 255
    photo[:, 150:, 2] = 255
    monkeypatch.setattr(demo_images, "load_photo", lambda name: photo)
    splits = make_demo_splits(tmp_path, train_per_class=12, held_out_per_class=12, min_side=32, max_side=80,
                              num_classes=2)
    for folder, own, other in ((splits.train, 0, 2), (splits.held_out, 2, 0)):
        paths = sorted(folder.rglob("*.jpg"))
        assert len(paths) == 24
        for path in paths:
            pixels = np.asarray(Image.open(path).convert("RGB"))
            assert pixels[..., own].min() > 200 and pixels[..., other].max() < 60, path


@pytest.mark.parametrize("train, held_out", [(0, 2), (2, 0)])
def test_every_split_needs_an_image_per_class(tmp_path, train, held_out):
    with pytest.raises(ValueError, match="images per class"):
        make_demo_splits(tmp_path, train, held_out)
