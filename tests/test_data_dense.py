"""Dense data: the shapes generator, segmentation/detection shards, their loaders and bad input.

Data: ``make_dense_shapes`` (10 training + 3 validation images, sides 64-160 px, non-square), sharded as
segmentation (ADE20K convention, reduce_zero_label: the 4 shape classes, background ignored) and as
detection (COCO JSON).
"""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.dense_shapes import CLASS_COLOURS, SHAPES, make_dense_shapes
from data_tools.verify_shards import verify
from itpn_ds.cli import main as cli
from itpn_ds.data import build_detection_loader, build_segmentation_loader
from itpn_ds.data.annotations import SEGMENTATION, DenseSpec, instance_masks, label_lut, mask_box
from itpn_ds.data.det_pipeline import DetRecipe, SampleGeometry, resized_size, transform_sample
from itpn_ds.data.seg_pipeline import SegImageDecoder
from itpn_ds.data.seg_transforms import (Photometric, SegPlan, SegRecipe, category_ratio_ok, crop_labels,
                                         photometric_numpy, rescale_size, train_plan)
from itpn_ds.data.shard_loader import IMAGENET_MEAN, IMAGENET_STD
from itpn_ds.data.shards import Manifest, ShardError, ShardReader

NUM_TRAIN, NUM_VAL = 10, 3
SMALL = SegRecipe(crop_size=(64, 96), scale=(256, 128))  # rescale to about 128 px short side x 0.5-2
NO_COLOUR = SegRecipe(crop_size=(64, 96), scale=(256, 128), photometric=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dense_shapes(tmp_path_factory.mktemp("shapes"), NUM_TRAIN, NUM_VAL, seed=0, min_side=64, max_side=160)


def seg_args(shapes, out, *extra):
    return ["make-shards", str(shapes.images("training")), str(out), "--kind", "segmentation", "--annotations",
            str(shapes.annotations("training")), "--class-names", str(shapes.class_names), "--reduce-zero-label",
            "--quiet", *extra]


def det_args(shapes, out, coco=None, *extra):
    return ["make-shards", str(shapes.images("training")), str(out), "--kind", "detection", "--annotations",
            str(coco or shapes.coco("training")), "--quiet", *extra]


@pytest.fixture(scope="module")
def seg_shards(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_shards")
    assert cli(seg_args(shapes, out, "--shard-size", "0.05")) == 0
    return out


@pytest.fixture(scope="module")
def det_shards(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("det_shards")
    assert cli(det_args(shapes, out)) == 0
    return out


# ------------------------------------------------------------------------------------------ generator

def test_generator_is_deterministic_and_its_boxes_are_the_tight_boxes_of_its_masks(shapes, tmp_path):
    again = make_dense_shapes(tmp_path / "again", NUM_TRAIN, NUM_VAL, seed=0, min_side=64, max_side=160)
    files = sorted(p.relative_to(shapes.root) for p in shapes.root.rglob("*") if p.is_file())
    assert len(files) == 2 * (NUM_TRAIN + NUM_VAL) + 3  # jpg + png each, 2 COCO files, class names
    assert all((shapes.root / f).read_bytes() == (again.root / f).read_bytes() for f in files)
    other = make_dense_shapes(tmp_path / "other", 2, 0, seed=1, min_side=64, max_side=160)
    assert (other.images("training") / "shapes_00000.jpg").read_bytes() != \
        (shapes.images("training") / "shapes_00000.jpg").read_bytes()
    for split in ("training", "validation"):
        coco = json.loads(shapes.coco(split).read_text())
        assert [c["name"] for c in coco["categories"]] == list(SHAPES)
        sizes = {(i["width"], i["height"]) for i in coco["images"]}
        assert len(sizes) == len(coco["images"]) and sum(w != h for w, h in sizes) >= len(sizes) - 1
        for image in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            label_map = np.asarray(Image.open(shapes.annotations(split) / image["file_name"].replace(".jpg", ".png")))
            assert label_map.shape == (image["height"], image["width"]) and anns
            masks = instance_masks(anns, image["height"], image["width"])
            union = np.zeros_like(label_map)
            for ann, mask in zip(anns, masks):
                assert ann["bbox"] == mask_box(mask) and ann["area"] == mask.sum()
                assert (label_map[mask > 0] == ann["category_id"]).all()
                union += mask
            assert union.max() == 1 and ((union > 0) == (label_map > 0)).all()  # visible masks partition


def test_generator_cli_refuses_bad_sizes(tmp_path, capsys):
    assert cli(["make-dense-shapes", str(tmp_path / "x"), "--min-side", "200", "--max-side", "100"]) == 2
    assert "min side <= max side" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- shards

def test_segmentation_shards_round_trip(shapes, seg_shards, capsys):
    manifest = Manifest.load(seg_shards)
    assert (manifest.kind, manifest.ignore_index, manifest.reduce_zero_label) == (SEGMENTATION, 255, True)
    assert manifest.classes == {name: i for i, name in enumerate(SHAPES)} and manifest.labels == []
    assert len(manifest) == NUM_TRAIN and len(manifest.shards) >= 2
    reader = ShardReader(seg_shards)
    for i, key in enumerate(manifest.keys):
        assert reader.encoded(i) == (shapes.images("training") / f"{key}.jpg").read_bytes()
        assert reader.annotation(i) == (shapes.annotations("training") / f"{key}.png").read_bytes()
        assert Image.open(io.BytesIO(reader.annotation(i))).size == tuple(manifest.sizes[i])
    assert cli(["verify-shards", str(seg_shards)]) == 0
    assert f"{NUM_TRAIN} samples, 4 classes (segmentation): OK" in capsys.readouterr().out

    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(manifest), num_threads=1, device_id=None)
    def read_all():
        jpg, png = fn.readers.webdataset(paths=[str(seg_shards / s.tar) for s in manifest.shards],
                                         index_paths=[str(seg_shards / s.index) for s in manifest.shards],
                                         ext=["jpg", "png"])
        return jpg, png

    pipe = read_all()
    pipe.build()
    _, pngs = pipe.run()
    assert [bytes(np.array(pngs.at(i))) for i in range(len(manifest))] == [reader.annotation(i) for i in range(len(manifest))]


def test_detection_shards_round_trip(shapes, det_shards, capsys):
    manifest = Manifest.load(det_shards)
    assert manifest.kind == "detection" and manifest.category_ids == [1, 2, 3, 4]
    assert manifest.classes == {name: i + 1 for i, name in enumerate(SHAPES)}
    coco = json.loads(shapes.coco("training").read_text())
    by_key = {i["file_name"][:-4]: i for i in coco["images"]}
    reader = ShardReader(det_shards)
    for i, key in enumerate(manifest.keys):
        record = json.loads(reader.annotation(i))
        image = by_key[key]
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert (record["width"], record["height"]) == (image["width"], image["height"]) == tuple(manifest.sizes[i])
        assert [a["bbox"] for a in record["instances"]] == [a["bbox"] for a in anns]
        assert [a["label"] for a in record["instances"]] == [a["category_id"] for a in anns]
    assert cli(["verify-shards", str(det_shards)]) == 0
    assert "(detection): OK" in capsys.readouterr().out


def test_classification_shards_are_unchanged_by_the_dense_kinds(demo_shards):
    manifest = Manifest.load(demo_shards)
    assert manifest.kind == "classification" and manifest.annotation_ext == "cls"
    reader = ShardReader(demo_shards)
    assert reader.annotation(0) == str(manifest.labels[0]).encode()


# -------------------------------------------------------------------------------- segmentation loader

def unnormalized(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalized -> (B, H, W, 3) uint8 levels (float)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def interior(labels: np.ndarray, value: int, radius: int) -> np.ndarray:
    """Pixels at least ``radius`` px inside the region ``labels == value`` (away from the edges that
    resampling and JPEG's 2x2 chroma blocks blur)."""
    inside = np.pad(labels == value, 1)
    for _ in range(radius):
        inside[1:-1, 1:-1] = np.all([inside[1 + dy:inside.shape[0] - 1 + dy, 1 + dx:inside.shape[1] - 1 + dx]
                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    return inside[1:-1, 1:-1]


def colour_matches(image: np.ndarray, label: np.ndarray, dy: int, dx: int) -> int:
    """Labelled pixels whose colour (at the pixel ``(dy, dx)`` away) is their class colour, counted over
    the crop less a 2 px margin."""
    colours = np.array(CLASS_COLOURS + ((0, 0, 0),) * (256 - len(CLASS_COLOURS)))
    h, w = label.shape
    lab = label[2:h - 2, 2:w - 2]
    pix = image[2 + dy:h - 2 + dy, 2 + dx:w - 2 + dx]
    return int(((lab < len(SHAPES)) & (np.abs(pix - colours[lab]).max(axis=-1) < 60)).sum())


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_seg_train_labels_stay_on_their_shapes_through_rescale_crop_flip(seg_shards, backend):
    loader = build_segmentation_loader(seg_shards, micro_batch=3, recipe=NO_COLOUR, backend=backend, seed=3)
    checked = flips = 0
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    matches = np.zeros(len(offsets), dtype=np.int64)  # colour matches of the label maps shifted by each offset
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.images.shape == (3, 3, 64, 96) and batch.label_maps.shape == (3, 64, 96)
            assert batch.label_maps.dtype == torch.int64
            assert set(batch.label_maps.unique().tolist()) <= {0, 1, 2, 3, 255}
            pixels, labels = unnormalized(batch.images), batch.label_maps.numpy()
            for key, image, label in zip(batch.keys, pixels, labels):
                plan = train_plan(3, key, epoch, loader.labels(loader.manifest.keys.index(key)), NO_COLOUR)
                flips += plan.flip
                _, _, w, h = plan.box
                radius = 1 + int(np.ceil(2 * plan.size[0] / loader.manifest.sizes[loader.manifest.keys.index(key)][0]))
                assert (label[h:] == 255).all() and (label[:, w:] == 255).all()  # padding: ignored, image 0
                assert np.allclose(image[h:], 255 * np.array(IMAGENET_MEAN), atol=0.5)
                for cls in range(len(SHAPES)):
                    inside = interior(label, cls, radius)
                    if inside.sum() < 10:
                        continue
                    close = np.abs(image[inside] - np.array(CLASS_COLOURS[cls])).max(axis=1) < 60
                    assert close.mean() > 0.95, (key, SHAPES[cls], close.mean())
                    checked += 1
                matches += [colour_matches(image, label, dy, dx) for dy, dx in offsets]
    assert checked >= 10 and flips >= 2
    assert offsets[int(np.argmax(matches))] == (0, 0)  # image and labels line up to the pixel


def test_seg_dali_and_torch_loaders_agree_with_photometric_distortion(seg_shards):
    torch_batches = list(build_segmentation_loader(seg_shards, micro_batch=4, recipe=SMALL, backend="torch", seed=5))
    dali_batches = list(build_segmentation_loader(seg_shards, micro_batch=4, recipe=SMALL, backend="dali", seed=5))
    assert len(torch_batches) == len(dali_batches) == 3
    for a, b in zip(torch_batches, dali_batches):
        assert a.keys == b.keys and torch.equal(a.label_maps, b.label_maps) and torch.equal(a.valid, b.valid)
        assert (a.images - b.images).abs().mean() < 0.02  # resize kernels differ by a level or two at edges
    assert dali_batches[-1].valid.tolist() == [True, True, False, False]


@pytest.mark.parametrize("params", [Photometric(brightness=-20.3), Photometric(brightness=25.0),
                                    Photometric(contrast=1.3), Photometric(contrast=0.6, contrast_first=False),
                                    Photometric(saturation=1.4), Photometric(saturation=0.5),
                                    Photometric(hue=30.0), Photometric(hue=-36.0),
                                    Photometric(12.0, 0.8, False, 1.3, -20.0)])
def test_photometric_numpy_matches_the_dali_graph(params):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")  # lossless: the decoders see exactly these pixels
    decoder = SegImageDecoder((0.0, 0.0, 0.0), (1 / 255,) * 3, pad_to=(24, 40), photometric=True, device="cpu",
                              batch_size=1)
    plan = SegPlan((40, 24), (0, 0, 40, 24), photometric=params)
    dali = decoder.decode([out.getvalue()], [plan])[0].permute(1, 2, 0).numpy()
    diff = np.abs(dali - photometric_numpy(pixels, params).astype(np.float32))
    assert diff.max() <= 1.0 and diff.mean() < 0.1


def test_cat_max_ratio_redraws_crops_dominated_by_one_class(seg_shards):
    labels = np.zeros((200, 300), dtype=np.uint8)
    labels[20:60, 200:260] = 1  # a crop with two classes and < 75 % of one exists only near the square
    labels[150:, :] = 255
    recipe = SegRecipe(crop_size=(64, 64), scale=(300, 200), ratio_range=(1.0, 1.0), photometric=False)
    plans = [train_plan(0, f"k{i}", 0, labels, recipe) for i in range(40)]
    unchecked = [train_plan(0, f"k{i}", 0, labels, SegRecipe(crop_size=(64, 64), scale=(300, 200),
                                                              ratio_range=(1.0, 1.0), cat_max_ratio=1.0))
                 for i in range(40)]
    ok = [category_ratio_ok(crop_labels(labels, p.size, p.box), 0.75, 255) for p in plans]
    assert all(o for o, p in zip(ok, plans) if p.crop_tries <= 10) and any(p.crop_tries > 1 for p in plans)
    assert sum(ok) > sum(category_ratio_ok(crop_labels(labels, p.size, p.box), 0.75, 255) for p in unchecked)
    # through the loader: every crop that was accepted (not the 11th, unchecked draw) passes the test
    loader = build_segmentation_loader(seg_shards, micro_batch=5, recipe=SMALL, backend="torch", seed=1)
    for batch in loader:
        for key, label in zip(batch.keys, batch.label_maps.numpy()):
            plan = train_plan(1, key, 0, loader.labels(loader.manifest.keys.index(key)), SMALL)
            assert plan.crop_tries > 10 or category_ratio_ok(label.astype(np.uint8), 0.75, 255)


def test_seg_train_loader_splits_ranks_and_resumes_exactly(seg_shards):
    ranks = [build_segmentation_loader(seg_shards, micro_batch=2, recipe=SMALL, backend="torch", seed=2, rank=r,
                                       world_size=2) for r in range(2)]
    batches = [list(loader) for loader in ranks]
    keys = [k for rank in batches for b in rank for k, v in zip(b.keys, b.valid) if v]
    assert sorted(keys) == sorted(Manifest.load(seg_shards).keys) and len(batches[0]) == len(batches[1]) == 3
    loader = build_segmentation_loader(seg_shards, micro_batch=2, recipe=SMALL, backend="torch", seed=2)
    loader.set_epoch(1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = list(it)
    resumed = build_segmentation_loader(seg_shards, micro_batch=2, recipe=SMALL, backend="torch", seed=2)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(again) == len(rest) == 4
    for a, b in zip(rest, again):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.label_maps, b.label_maps)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_seg_eval_loader_rescales_images_and_keeps_labels_at_original_size(shapes, seg_shards, backend):
    loader = build_segmentation_loader(seg_shards, train=False, micro_batch=4, scale=(256, 128), backend=backend)
    manifest = loader.manifest
    lut = label_lut(4, True)
    seen = 0
    for batch in loader:
        for i, key in enumerate(batch.keys):
            width, height = manifest.sizes[manifest.keys.index(key)]
            assert tuple(batch.image_sizes[i].tolist()) == rescale_size(width, height, (256, 128))[::-1]
            assert tuple(batch.label_sizes[i].tolist()) == (height, width)
            raw = np.asarray(Image.open(shapes.annotations("training") / f"{key}.png"))
            assert np.array_equal(batch.label_maps[i, :height, :width].numpy(), lut[raw])
            assert (batch.label_maps[i, height:] == 255).all() and (batch.label_maps[i, :, width:] == 255).all()
            h, w = batch.image_sizes[i].tolist()
            assert (batch.images[i, :, h:] == 0).all() and (batch.images[i, :, :, w:] == 0).all()
            seen += bool(batch.valid[i])
    assert seen == NUM_TRAIN


def test_seg_loader_refuses_other_shard_kinds(det_shards):
    with pytest.raises(ShardError, match="a detection shard directory, the segmentation loader needs"):
        build_segmentation_loader(det_shards, micro_batch=2, backend="torch")


# ----------------------------------------------------------------------------------- detection loader

def test_detection_loader_boxes_follow_masks_through_resize_and_flip(det_shards):
    recipe = DetRecipe(short_sides=(96, 128, 160), max_long_side=200, crop_prob=0.0)
    loader = build_detection_loader(det_shards, micro_batch=4, recipe=recipe, seed=0)
    flips = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            for image, target, key in zip(batch.images, batch.targets, batch.keys):
                h, w = image.shape[1:]
                assert tuple(target["size"].tolist()) == (h, w) and (min(h, w) in recipe.short_sides or max(h, w) <= 200)
                assert target["masks"].shape == (len(target["boxes"]), h, w) and target["masks"].dtype == torch.uint8
                assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3, 4}
                scale = w / target["orig_size"][1].item()
                for box, mask in zip(target["boxes"], target["masks"]):
                    x, y, bw, bh = mask_box(mask.numpy())
                    # nearest sampling: edges within half a pixel, plus one when downscaling skips a thin tip
                    assert np.allclose(box.numpy(), [x, y, x + bw, y + bh], atol=0.5 + (scale < 1) + 1e-3)
                flips += loader.sample_geometry(key, *target["orig_size"].flip(0).tolist()).flip
    assert flips >= 3
    evaluation = build_detection_loader(det_shards, train=False, micro_batch=3, short_side=128, max_long_side=1333)
    batch = next(iter(evaluation))
    assert all(min(i.shape[1:]) == 128 for i in batch.images)


def test_a_crop_keeps_its_region_clips_the_boxes_it_cuts_and_drops_the_instances_outside():
    """A 100 x 80 black image with two white rectangles; the crop (20, 30)-(70, 70) resampled 2x to 100 x 80:
    the first rectangle (10, 20, 30 x 40) is cut to (20, 30)-(40, 60), i.e. (0, 0, 40, 60) after the crop and
    the resize; the second (80, 0, 10 x 10) lies outside and is dropped with its label and mask."""
    pixels = np.zeros((80, 100, 3), dtype=np.uint8)
    pixels[20:60, 10:40] = 255
    pixels[0:10, 80:90] = 255
    record = {"image_id": 7, "instances": [
        {"bbox": [10, 20, 30, 40], "label": 1, "iscrowd": 0, "segmentation": [[10, 20, 40, 20, 40, 60, 10, 60]]},
        {"bbox": [80, 0, 10, 10], "label": 2, "iscrowd": 0, "segmentation": [[80, 0, 90, 0, 90, 10, 80, 10]]}]}
    geometry = SampleGeometry((20.0, 30.0, 70.0, 70.0), (100, 80), cropped=True)
    image, target = transform_sample(Image.fromarray(pixels), record, geometry, keep_crowd=False)
    assert image.shape == (3, 80, 100) and target["size"].tolist() == [80, 100]
    assert target["boxes"].tolist() == [[0.0, 0.0, 40.0, 60.0]] and target["labels"].tolist() == [1]
    mask = target["masks"][0].numpy()
    assert mask.shape == (80, 100) and mask.sum() == 40 * 60 and mask[:60, :40].all()
    white = image.mean(0).numpy()
    assert (white[:59, :39] > 0.99).all() and (white[:, 42:] < 0.01).all() and (white[62:] < 0.01).all()
    flipped = transform_sample(Image.fromarray(pixels), record, replace(geometry, flip=True), keep_crowd=False)[1]
    assert flipped["boxes"].tolist() == [[60.0, 0.0, 100.0, 60.0]] and flipped["masks"][0, :60, 60:].all()
    # an uncropped geometry keeps every instance and equals the plain resize
    whole = transform_sample(Image.fromarray(pixels), record, SampleGeometry.whole(100, 80, (50, 40)), False)[1]
    assert whole["boxes"].tolist() == [[5.0, 10.0, 20.0, 30.0], [40.0, 0.0, 45.0, 5.0]]


def crop_fits(crop, width, height, first_size, crop_size) -> bool:
    """Whether ``crop`` (in the original's px) is a whole-pixel crop of the image resized to ``first_size``
    whose height and width lie in ``crop_size`` (each capped by the resized image's side)."""
    (x0, y0, x1, y1), (w1, h1), (low, high) = crop, first_size, crop_size
    edges = np.array([x0 * w1 / width, y0 * h1 / height, x1 * w1 / width, y1 * h1 / height])
    if not np.allclose(edges, edges.round(), atol=1e-6):
        return False
    cw, ch = round(edges[2] - edges[0]), round(edges[3] - edges[1])
    return min(w1, low) <= cw <= min(w1, high) and min(h1, low) <= ch <= min(h1, high)


def test_the_crop_branch_draws_like_the_published_recipe_and_its_targets_stay_inside_the_boxes(det_shards):
    """crop_prob 0.5 over 2 epochs of the 12 shapes images: about half the samples cropped; each crop's
    height and width in the first resize's pixels within ``crop_size`` (or the whole side where that is
    smaller), the crop resized to a drawn short side; masks inside their (clipped) boxes; the draws replay."""
    recipe = DetRecipe(short_sides=(96, 128, 160), max_long_side=267, crop_prob=0.5, crop_short_sides=(80, 100, 120),
                       crop_size=(77, 120))
    loader = build_detection_loader(det_shards, micro_batch=4, recipe=recipe, seed=0)
    cropped = seen = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            for image, target, key in zip(batch.images, batch.targets, batch.keys):
                seen += 1
                h0, w0 = target["orig_size"].tolist()
                geometry = loader.sample_geometry(key, w0, h0)
                assert geometry == loader.sample_geometry(key, w0, h0)  # keyed by (seed, key, epoch): replays
                h, w = image.shape[1:]
                assert (w, h) == geometry.size and (min(h, w) in recipe.short_sides or max(h, w) == 267)
                assert target["masks"].shape == (len(target["boxes"]), h, w)
                if geometry.cropped:
                    cropped += 1
                    x0, y0, x1, y1 = geometry.crop
                    assert 0 <= x0 < x1 <= w0 and 0 <= y0 < y1 <= h0
                    assert any(crop_fits(geometry.crop, w0, h0, resized_size(w0, h0, side, 267), recipe.crop_size)
                               for side in recipe.crop_short_sides), (geometry, w0, h0)
                for box, mask in zip(target["boxes"].numpy(), target["masks"].numpy()):
                    assert box[2] > box[0] and box[3] > box[1]
                    ys, xs = np.nonzero(mask)
                    if len(xs):
                        assert xs.min() >= box[0] - 1.5 and xs.max() + 1 <= box[2] + 1.5
                        assert ys.min() >= box[1] - 1.5 and ys.max() + 1 <= box[3] + 1.5
    assert seen == 24 and 6 <= cropped <= 18, (cropped, seen)
    plain = build_detection_loader(det_shards, micro_batch=4, recipe=replace(recipe, crop_prob=0.0), seed=0)
    key = plain.manifest.keys[0]
    assert not plain.sample_geometry(key, 120, 100).cropped


# ---------------------------------------------------------------------------------------- bad input

def copy_set(shapes, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(shapes.root, root)
    return type(shapes)(root)


def bad_report(out) -> str:
    return (out / "bad_files.tsv").read_text()


def test_label_map_of_another_size_is_a_named_bad_sample(shapes, tmp_path, capsys):
    data = copy_set(shapes, tmp_path)
    png = data.annotations("training") / "shapes_00003.png"
    Image.open(png).crop((0, 0, 50, 40)).save(png)
    out = tmp_path / "out"
    assert cli(seg_args(data, out)) == 2
    assert f"1 of {NUM_TRAIN} inputs are bad" in capsys.readouterr().err
    report = bad_report(out)
    assert "shapes_00003.jpg (sample 'shapes_00003')" in report and "label map is 50x40, its image is" in report
    assert len(Manifest.load(out)) == NUM_TRAIN - 1
    assert cli(seg_args(data, tmp_path / "tolerant", "--max-bad-fraction", "0.2")) == 0


def test_label_values_outside_the_class_list_are_named(shapes, tmp_path):
    data = copy_set(shapes, tmp_path)
    png = data.annotations("training") / "shapes_00001.png"
    labels = np.asarray(Image.open(png)).copy()
    labels[0, :3] = [7, 9, 255]  # 255 is the ignore index: allowed
    Image.fromarray(labels).save(png)
    out = tmp_path / "out"
    assert cli(seg_args(data, out)) == 2
    assert "label values [7, 9] outside the class list (valid: 0..4 and 255 = ignore" in bad_report(out)


def test_image_without_label_map_and_missing_arguments_exit_2(shapes, tmp_path, capsys):
    data = copy_set(shapes, tmp_path)
    (data.annotations("training") / "shapes_00002.png").unlink()
    assert cli(seg_args(data, tmp_path / "out")) == 2
    assert "shapes_00002.jpg: no label map (expected" in capsys.readouterr().err
    assert cli(["make-shards", str(data.images("training")), str(tmp_path / "o"), "--kind", "segmentation",
                "--annotations", str(data.annotations("training"))]) == 2
    assert "needs --class-names" in capsys.readouterr().err


def test_annotation_file_naming_missing_images_and_unknown_ids(shapes, tmp_path, capsys):
    data = copy_set(shapes, tmp_path)
    (data.images("training") / "shapes_00004.jpg").unlink()
    out = tmp_path / "out"
    assert cli(det_args(data, out)) == 2
    report = bad_report(out)
    assert f"{data.coco('training')} names image 'shapes_00004.jpg' (id 5), which does not exist" in report
    coco = json.loads(data.coco("training").read_text())
    coco["annotations"][0]["image_id"] = 999
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(coco))
    assert cli(det_args(data, tmp_path / "o2", broken)) == 2
    assert f"{broken}: annotation {coco['annotations'][0]['id']} names image id 999" in capsys.readouterr().err


@pytest.mark.parametrize("bbox,message", [([150.0, 10.0, 40.0, 20.0], "outside the"),
                                          ([-5.0, 10.0, 20.0, 20.0], "outside the"),
                                          ([10.0, 10.0, 0.0, 20.0], "degenerate box")])
def test_boxes_outside_the_image_or_degenerate_are_named(shapes, tmp_path, bbox, message):
    data = copy_set(shapes, tmp_path)
    coco = json.loads(data.coco("training").read_text())
    image = coco["images"][0]
    bbox[0] = bbox[0] if bbox[0] < 100 else image["width"] - 10.0
    ann = next(a for a in coco["annotations"] if a["image_id"] == image["id"])
    ann["bbox"] = bbox
    data.coco("training").write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert cli(det_args(data, out)) == 2
    report = bad_report(out)
    assert f"{image['file_name']} (sample '{image['file_name'][:-4]}')" in report
    assert f"annotation {ann['id']}: " in report and message in report


def test_verify_names_a_label_map_that_no_longer_fits_its_sample(seg_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(seg_shards, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["sizes"][2] = [raw["sizes"][2][0] + 1, raw["sizes"][2][1]]
    (copy / "manifest.json").write_text(json.dumps(raw))
    (problem,) = verify(copy)
    assert f"{raw['keys'][2]}.png: label map is" in problem and problem.startswith(str(copy))


def test_dense_spec_and_shard_options_refuse_bad_values(shapes, tmp_path, capsys):
    with pytest.raises(ValueError, match="num_classes must be in 1..254"):
        DenseSpec(SEGMENTATION, 255, reduce_zero_label=True)
    assert cli(seg_args(shapes, tmp_path / "o", "--max-short-side", "64")) == 2
    assert "--max-short-side is not supported for segmentation shards" in capsys.readouterr().err
