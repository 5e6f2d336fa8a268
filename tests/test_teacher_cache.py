"""Teacher cache: extraction over the demo shards, replay through the pre-training loader, refusals."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from itpn_ds.cli import main as cli_main
from itpn_ds.data import build_pretrain_loader
from itpn_ds.data.shards import Manifest, ShardReader
from itpn_ds.data.view_decoder import ViewDecoder
from itpn_ds.data.views import CropView, sample_view, view_for_epoch
from itpn_ds.teacher.cache import CacheError, TeacherCache
from itpn_ds.teacher.clip import load_clip_teacher
from itpn_ds.teacher.extract import ExtractConfig, Worker, extract_cache
from tests.fixtures.teacher import DEMO_CACHE_SEED, DEMO_CACHE_VIEWS, TINY_RESOLUTION


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()


def test_cache_replays_stored_views_and_serves_targets(demo_cache, demo_shards):
    cache = TeacherCache(demo_cache, shards=demo_shards)
    manifest = Manifest.load(demo_shards)
    assert len(cache) == len(manifest) and cache.num_views == DEMO_CACHE_VIEWS
    keys, sizes = manifest.keys[:5], manifest.sizes[:5]
    for epoch in (0, 1, 7):
        pairs = cache.views(keys, sizes, epoch)
        for key, (w, h), (view_id, view) in zip(keys, sizes, pairs):
            assert view_id == view_for_epoch(DEMO_CACHE_SEED, key, epoch, DEMO_CACHE_VIEWS)
            assert view == sample_view(DEMO_CACHE_SEED, key, view_id, w, h)
    targets = cache.targets(keys, [p[0] for p in pairs])
    assert targets.dtype == torch.float32 and targets.shape == (5, 16, 32)


def test_cached_targets_equal_teacher_on_the_pipeline_view(demo_cache, demo_shards, tiny_clip_checkpoint):
    """Exactness: the teacher run on the view the pre-training loader decodes agrees with the cache;
    the same check fails on a wrong box (the stored box's centre half) and on a wrong flip."""
    teacher = load_clip_teacher(tiny_clip_checkpoint)
    cache = TeacherCache(demo_cache, shards=demo_shards, expected_teacher=teacher.identity.as_dict())
    loader = build_pretrain_loader(demo_shards, views=cache, micro_batch=8, img_size=64,
                                   teacher_resolution=TINY_RESOLUTION, device="cpu")
    loader.set_epoch(3)
    batch = next(iter(loader))
    assert _cosine(teacher(batch.teacher_images), batch.targets) >= 0.99

    reader = ShardReader(demo_shards)
    decoder = ViewDecoder([(TINY_RESOLUTION, "lanczos")], device="cpu", batch_size=8)
    pairs = cache.views(batch.keys, [reader.manifest.sizes[reader.index_of(k)] for k in batch.keys], 3)
    encoded = [reader.read(k) for k in batch.keys]
    (stored,) = decoder.decode(encoded, [v for _, v in pairs])
    torch.testing.assert_close(stored, batch.teacher_images)  # the loader decoded the stored views
    wrong_box = [CropView(v.x + v.w // 4, v.y + v.h // 4, v.w // 2, v.h // 2, v.flip) for _, v in pairs]
    wrong_flip = [CropView(v.x, v.y, v.w, v.h, not v.flip) for _, v in pairs]
    for wrong_views in (wrong_box, wrong_flip):
        (wrong,) = decoder.decode(encoded, wrong_views)
        assert _cosine(teacher(wrong), batch.targets) < 0.9


def test_int8_close_to_fp16_at_about_half_the_bytes(demo_cache, demo_shards, tiny_clip_checkpoint, tmp_path):
    extract_cache(ExtractConfig(shards=demo_shards, out=tmp_path, checkpoint=tiny_clip_checkpoint,
                                num_views=DEMO_CACHE_VIEWS, seed=DEMO_CACHE_SEED, dtype="int8", batch_size=16,
                                progress=False))
    fp16, int8 = TeacherCache(demo_cache), TeacherCache(tmp_path)
    keys = Manifest.load(demo_shards).keys
    views = [0] * len(keys)
    assert _cosine(int8.targets(keys, views), fp16.targets(keys, views)) >= 0.999
    size = lambda d: sum(p.stat().st_size for p in Path(d).glob("*.arrow"))  # noqa: E731
    assert 0.45 < size(tmp_path) / size(demo_cache) < 0.7


def test_resume_skips_finished_files_and_refuses_other_settings(demo_cache, demo_shards, tiny_clip_checkpoint,
                                                                tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(demo_cache, out)
    (out / "shard-00001.arrow").unlink()
    cfg = ExtractConfig(shards=demo_shards, out=out, checkpoint=tiny_clip_checkpoint, num_views=DEMO_CACHE_VIEWS,
                        seed=DEMO_CACHE_SEED, batch_size=16, progress=False)
    assert [p.name for p in extract_cache(cfg)] == ["shard-00001.arrow"]
    assert extract_cache(cfg) == []
    cfg.seed = 5
    with pytest.raises(CacheError, match=r"shard-00000.arrow: exists but was made differently \(seed differ"):
        extract_cache(cfg)


def test_refuses_mismatched_missing_or_corrupt_cache(demo_cache, demo_shards, tmp_path):
    with pytest.raises(CacheError, match="another teacher.*resolution: cache 56, run 196"):
        TeacherCache(demo_cache, expected_teacher={"resolution": 196})
    with pytest.raises(CacheError, match="sample 'nope' is not in the teacher cache"):
        TeacherCache(demo_cache).targets(["nope"], [0])

    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = Manifest.load(demo_shards)
    manifest.shards[1].sha256 = "0" * 64
    manifest.save(shards)
    with pytest.raises(CacheError, match=r"shard-00001.arrow: made from a different shard-00001.tar"):
        TeacherCache(demo_cache, shards=shards)

    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    (cache / "shard-00002.arrow").unlink()
    with pytest.raises(CacheError, match=r"shard-00002.arrow: missing"):
        TeacherCache(cache, shards=demo_shards)
    data = (cache / "shard-00000.arrow").read_bytes()
    (cache / "shard-00000.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=r"shard-00000.arrow: not a readable Arrow IPC file"):
        TeacherCache(cache)


def test_worker_split_over_array_tasks_and_ranks():
    worker = Worker.detect({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "1",
                            "WORLD_SIZE": "2"})
    assert (worker.index, worker.count) == (3, 4)
    assert [n for n in range(10) if worker.owns(n)] == [3, 7]


def test_cli_extract_teacher(demo_shards, tiny_clip_checkpoint, tmp_path):
    rc = cli_main(["extract-teacher", "--shards", str(demo_shards), "--out", str(tmp_path),
                   "--teacher-checkpoint", str(tiny_clip_checkpoint), "--num-views", "1", "--batch-size", "32",
                   "--no-progress"])
    assert rc == 0
    cache = TeacherCache(tmp_path, shards=demo_shards)
    assert cache.num_views == 1 and cache.teacher["arch"] == "openai:vit-w64-l2-p14"


def test_cli_names_a_corrupt_sample_and_a_missing_checkpoint(demo_shards, tiny_clip_checkpoint, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    reader = ShardReader(shards)
    bad = reader.manifest.shards[0].num_samples + 2  # the third sample of shard-00001
    location = reader.locations[bad]
    with open(shards / "shard-00001.tar", "r+b") as tar:  # keep the JPEG's first bytes, zero the rest
        tar.seek(location.offset + 20)
        tar.write(bytes(location.size - 20))
    args = ["extract-teacher", "--shards", str(shards), "--out", str(tmp_path / "cache"), "--num-views", "2",
            "--batch-size", "16", "--no-progress"]
    assert cli_main([*args, "--teacher-checkpoint", str(tiny_clip_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert f"shard-00001.tar: sample {reader.manifest.keys[bad]!r} cannot be decoded" in err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shard-00000.arrow", "shard-00001.arrow.tmp"]

    assert cli_main([*args, "--teacher-checkpoint", str(tmp_path / "ViT-L-14.pt")]) == 2
    assert "ViT-L-14.pt not found: nothing is downloaded" in capsys.readouterr().err
