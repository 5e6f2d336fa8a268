"""Shards: round trip through the writer, the reader and DALI's own webdataset reader; preprocessing; bad input."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itpn_ds.cli import main as cli_main
from itpn_ds.data.class_map import read_class_list
from itpn_ds.data.preprocess import BadImage, PreprocessOptions, prepare_image
from itpn_ds.data.shards import Manifest, ShardError, ShardReader, write_shards
from itpn_ds.data.sources import image_folder_items, renumber, table_items


def test_demo_shards_hold_every_image_once_with_its_label_and_size(demo_image_folder, demo_shards):
    manifest = Manifest.load(demo_shards)
    items, classes = image_folder_items(demo_image_folder)
    assert 2 <= len(manifest.shards) <= 3 and len(manifest) == len(items) == 40
    assert manifest.classes == classes and manifest.num_bad == 0
    by_key = {item.key: item for item in items}
    reader = ShardReader(demo_shards)
    for sample in reader:
        item = by_key.pop(sample.key)
        assert sample.label == item.label
        assert sample.data == open(item.path, "rb").read()  # clean RGB JPEGs are stored byte for byte
        assert Image.open(io.BytesIO(sample.data)).size == sample.size
    assert not by_key


def test_dali_webdataset_reader_reads_our_index_files(demo_shards):
    from nvidia.dali import fn, pipeline_def

    manifest = Manifest.load(demo_shards)

    @pipeline_def(batch_size=len(manifest), num_threads=1, device_id=None)
    def read_all():
        jpg, cls = fn.readers.webdataset(paths=[str(demo_shards / s.tar) for s in manifest.shards],
                                         index_paths=[str(demo_shards / s.index) for s in manifest.shards],
                                         ext=["jpg", "cls"])
        return jpg, cls

    pipe = read_all()
    pipe.build()
    jpgs, labels = pipe.run()
    reader = ShardReader(demo_shards)
    assert [bytes(np.array(jpgs.at(i))) for i in range(len(manifest))] == [s.data for s in reader]
    assert [int(bytes(np.array(labels.at(i)))) for i in range(len(manifest))] == manifest.labels


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("RGB", "BMP")])
def test_any_format_becomes_rgb_jpeg(mode, fmt):
    image = Image.new("RGB", (40, 30), (200, 30, 10)).convert(mode)
    data, width, height = prepare_image(_encode(image, fmt), PreprocessOptions())
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and (width, height) == decoded.size == (40, 30)


def test_exif_orientation_is_applied_and_shorter_side_capped():
    image = Image.new("RGB", (300, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(image, "JPEG", exif=exif.tobytes())
    _, width, height = prepare_image(data, PreprocessOptions())
    assert (width, height) == (100, 300)
    _, width, height = prepare_image(data, PreprocessOptions(max_short_side=50))
    assert (width, height) == (50, 150)


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_empty_undecodable_and_truncated_files_are_bad(data):
    if data is None:
        data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:-40]  # truncated
    with pytest.raises(BadImage):
        prepare_image(data, PreprocessOptions())


def test_bad_files_are_reported_and_counted_and_runs_resume(demo_image_folder, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(demo_image_folder, root)
    (root / "coffee" / "empty.jpg").write_bytes(b"")
    (root / "coffee" / "broken.png").write_bytes(b"\x89PNG garbage")
    items, classes = image_folder_items(root)
    out = tmp_path / "shards"
    manifest = write_shards(items, out, classes, str(root), target_shard_bytes=100_000, progress=False)
    assert manifest.num_bad == 2 and len(manifest) == 40
    report = (out / "bad_files.tsv").read_text()
    assert "empty.jpg" in report and "broken.png" in report
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = write_shards(items, out, classes, str(root), target_shard_bytes=100_000, progress=False)
    assert again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes  # kept, not rewritten
    assert not list(out.glob(".*tmp"))


def test_table_input_with_integer_labels(demo_image_folder, tmp_path):
    images = sorted(demo_image_folder.rglob("*.jpg"))[:3]
    table = tmp_path / "list.tsv"
    table.write_text("path\tlabel\n" + "".join(f"{p}\t{i * 5}\n" for i, p in enumerate(images)))
    items, classes = table_items(table)
    assert [i.label for i in items] == [0, 5, 10] and classes == {"0": 0, "5": 5, "10": 10}


def test_a_split_numbered_as_a_class_names_file_keeps_its_ids_and_rejects_other_classes(demo_image_folder, tmp_path):
    """``make-shards --classes-from FILE``: ids in the file's line order, whatever the folder's own order; the
    images of a class the file lacks are rejected with the reason, not numbered."""
    names = tmp_path / "names.txt"
    names.write_text("rocket\ncoffee\nzebra\n")
    items, classes = image_folder_items(demo_image_folder)
    kept, rejected = renumber(items, classes, read_class_list(names), str(names))
    assert {(item.path.split("/")[-2], item.label) for item in kept} == {("rocket", 0), ("coffee", 1)}
    assert len(kept) == len(rejected) == 20
    assert all(reason.startswith("class '") and reason.endswith(f"is not in the class list of {names}")
               for _, reason in rejected)


def test_reader_names_missing_shard_truncated_tar_and_bad_label(demo_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_shards, copy)
    manifest = Manifest.load(copy)
    last = copy / manifest.shards[-1].tar
    last.write_bytes(last.read_bytes()[:2000])
    with pytest.raises(ShardError, match=f"{last.name}: truncated"):
        ShardReader(copy)
    last.unlink()
    with pytest.raises(ShardError, match=f"{last.name}: shard listed in the manifest is missing"):
        ShardReader(copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["labels"][3] = 99
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=f"{raw['keys'][3]}.*label 99, outside the class map"):
        Manifest.load(copy)


def test_inputs_that_map_to_the_same_key_are_rejected_before_writing(demo_image_folder, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(demo_image_folder, root)
    clash = next((root / "coffee").glob("*.jpg"))
    Image.open(clash).save(clash.with_suffix(".png"))
    items, classes = image_folder_items(root)
    with pytest.raises(ShardError, match=f"both map to sample key 'coffee/{clash.stem}'"):
        write_shards(items, tmp_path / "out", classes, str(root), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_make_shards_with_a_shard_count_writes_that_many_of_about_equal_bytes(demo_image_folder, tmp_path):
    """``make-shards --num-shards 4`` on the 40 demo photos: 4 shards, every image once, and each shard's input
    bytes within one image of a quarter of the total (the cut falls before the image that crosses it)."""
    out = tmp_path / "shards"
    assert cli_main(["make-shards", str(demo_image_folder), str(out), "--num-shards", "4", "--quiet"]) == 0
    manifest = Manifest.load(out)
    assert len(manifest.shards) == 4 and len(manifest) == 40
    items = {item.key: item.path for item in image_folder_items(demo_image_folder)[0]}
    per_shard, start = [], 0
    for shard in manifest.shards:
        keys = manifest.keys[start:start + shard.num_samples]
        per_shard.append(sum(Path(items[k]).stat().st_size for k in keys))
        start += shard.num_samples
    largest_image = max(Path(p).stat().st_size for p in items.values())
    assert max(abs(b - sum(per_shard) / 4) for b in per_shard) <= largest_image, per_shard
