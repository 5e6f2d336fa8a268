"""verify-shards and make-shards through the CLI: a clean directory passes; each kind of damage is named."""
from __future__ import annotations

import json
import shutil

import pytest

from data_tools.verify_shards import verify
from itpn_ds.cli import main as cli
from itpn_ds.data.shards import Manifest


@pytest.fixture
def shard_copy(demo_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(demo_shards, copy)
    return copy, Manifest.load(copy)


def test_clean_shards_pass(demo_shards, capsys):
    assert cli(["verify-shards", str(demo_shards)]) == 0
    assert "40 samples" in capsys.readouterr().out


def test_missing_and_truncated_shards(shard_copy):
    copy, manifest = shard_copy
    first, second = (copy / s.tar for s in manifest.shards[:2])
    first.unlink()
    second.write_bytes(second.read_bytes()[:-1024])
    problems = verify(copy)
    assert problems[0] == f"{first}: missing shard"
    assert problems[1].startswith(f"{second}: ") and "truncated" in problems[1]


def test_checksum_mismatch(shard_copy):
    copy, manifest = shard_copy
    tar = copy / manifest.shards[0].tar
    raw = bytearray(tar.read_bytes())
    raw[2000] ^= 0xFF
    tar.write_bytes(bytes(raw))
    assert verify(copy) == [f"{tar}: sha256 does not match the manifest"]


def test_index_that_does_not_match_its_tar(shard_copy):
    copy, manifest = shard_copy
    index = copy / manifest.shards[1].index
    lines = index.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = str(int(fields[1]) + 512)
    index.write_text("\n".join([lines[0], " ".join(fields)] + lines[2:]) + "\n")
    (problem,) = verify(copy)
    assert problem.startswith(f"{index}: {fields[3]} at") and "does not match the tar member" in problem


def test_label_outside_class_map_and_empty_dataset(shard_copy, capsys):
    copy, _ = shard_copy
    raw = json.loads((copy / "manifest.json").read_text())
    raw["labels"][0] = 7
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert cli(["verify-shards", str(copy)]) == 2
    assert f"sample {raw['keys'][0]!r} has label 7, outside the class map" in capsys.readouterr().err
    raw.update(keys=[], labels=[], sizes=[], shards=[], crc32=[])
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert verify(copy) == [f"{copy}: empty dataset (the manifest lists no samples)"]


def test_make_shards_cli_reencodes_and_fails_on_too_many_bad_files(demo_image_folder, tmp_path, capsys):
    out = tmp_path / "capped"
    assert cli(["make-shards", str(demo_image_folder), str(out), "--shard-size", "0.05", "--max-short-side", "100",
                "--quiet"]) == 0
    manifest = Manifest.load(out)
    assert len(manifest) == 40 and len(manifest.shards) >= 2 and max(min(s) for s in manifest.sizes) == 100
    assert cli(["verify-shards", str(out)]) == 0
    images = tmp_path / "images"
    shutil.copytree(demo_image_folder, images)
    (images / "chelsea" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert cli(["make-shards", str(images), str(tmp_path / "bad"), "--max-bad-fraction", "0.01", "--quiet"]) == 2
    assert "1 of 41 inputs are bad" in capsys.readouterr().err
    assert cli(["make-shards", str(images), str(tmp_path / "bad"), "--max-bad-fraction", "0.05", "--quiet"]) == 0


def test_make_shards_rerun_remakes_a_damaged_finished_shard(demo_image_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["make-shards", str(demo_image_folder), str(out), "--shard-size", "0.1", "--quiet"]
    assert cli(args) == 0
    manifest = Manifest.load(out)
    damaged = out / manifest.shards[1].tar
    damaged.write_bytes(damaged.read_bytes()[:-2048])
    capsys.readouterr()
    assert cli(args) == 0
    assert f"{damaged}: finished earlier but no longer matches its sidecar" in capsys.readouterr().err
    assert Manifest.load(out).shards[1].sha256 == manifest.shards[1].sha256
    assert cli(["verify-shards", str(out)]) == 0
