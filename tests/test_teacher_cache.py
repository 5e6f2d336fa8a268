"""Teacher cache: extraction over the demo shards, replay through the pre-training loader, refusals."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from itpn_ds.cli import main as cli_main
from itpn_ds.data import build_pretrain_loader
from itpn_ds.data.shards import Manifest, ShardReader
from itpn_ds.data.view_decoder import ViewDecoder
from itpn_ds.data.color_jitter import NO_JITTER
from itpn_ds.data.views import sample_view, view_for_epoch
from itpn_ds.teacher.cache import CacheError, TeacherCache, open_cache_file
from itpn_ds.teacher.cache_format import META_KEY, CacheFileWriter
from itpn_ds.teacher.clip import load_clip_teacher
from itpn_ds.teacher.extract import ExtractConfig, ExtractionPreempted, Worker, extract_cache
from tests.fixtures.teacher import DEMO_CACHE_JITTER, DEMO_CACHE_SEED, DEMO_CACHE_VIEWS, TINY_RESOLUTION

FP16_TARGETS_ATOL = 1e-2  # targets of a LayerNorm (|t| < 8) stored as fp16: half an ulp is at most 2**-9


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()


def _rewrite_as_version_1(cache: Path, out: Path, version: int = 1) -> Path:
    """A copy of ``cache`` in the layout of format version 1 (no ``jitter`` or ``crc32`` column, no ``color_jitter`` in the
    metadata), record batches kept; ``version`` is the one its metadata claims."""
    out.mkdir()
    for path in sorted(cache.glob("*.arrow")):
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        meta = json.loads(reader.schema.metadata[META_KEY])
        del meta["color_jitter"]
        meta["format_version"] = version
        kept = [field for field in reader.schema if field.name not in ("jitter", "crc32")]
        schema = pa.schema(kept, metadata={META_KEY: json.dumps(meta).encode()})
        with pa.OSFile(str(out / path.name), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for i in range(reader.num_record_batches):
                columns = reader.get_batch(i).drop_columns(["jitter", "crc32"]).columns
                writer.write_batch(pa.record_batch(columns, schema=schema))
    return out


def test_cache_replays_stored_views_and_serves_targets(demo_cache, demo_shards):
    cache = TeacherCache(demo_cache, shards=demo_shards, color_jitter=DEMO_CACHE_JITTER)
    manifest = Manifest.load(demo_shards)
    assert len(cache) == len(manifest) and cache.num_views == DEMO_CACHE_VIEWS
    assert cache.meta.format_version == 3 and cache.color_jitter == DEMO_CACHE_JITTER
    keys, sizes = manifest.keys[:5], manifest.sizes[:5]
    for epoch in (0, 1, 7):
        pairs = cache.views(keys, sizes, epoch)
        for key, (w, h), (view_id, view) in zip(keys, sizes, pairs):
            assert view_id == view_for_epoch(DEMO_CACHE_SEED, key, epoch, DEMO_CACHE_VIEWS)
            assert view == sample_view(DEMO_CACHE_SEED, key, view_id, w, h, color_jitter=DEMO_CACHE_JITTER)
            assert view.jitter != NO_JITTER
    targets = cache.targets(keys, [p[0] for p in pairs])
    assert targets.dtype == torch.float32 and targets.shape == (5, 16, 32)


def test_cached_targets_equal_teacher_on_the_pipeline_view(demo_cache, demo_shards, tiny_clip_checkpoint):
    """Exactness: the teacher run on the (colour-jittered) view the pre-training loader decodes gives the
    cached targets within fp16 rounding; the same check fails on a wrong box (the stored box's centre half),
    a wrong flip, a wrong contrast factor and no jitter at all."""
    teacher = load_clip_teacher(tiny_clip_checkpoint)
    cache = TeacherCache(demo_cache, shards=demo_shards, expected_teacher=teacher.identity.as_dict(),
                         color_jitter=DEMO_CACHE_JITTER)
    loader = build_pretrain_loader(demo_shards, views=cache, micro_batch=8, img_size=64,
                                   teacher_resolution=TINY_RESOLUTION, device="cpu")
    loader.set_epoch(3)
    batch = next(iter(loader))
    torch.testing.assert_close(teacher(batch.teacher_images), batch.targets, atol=FP16_TARGETS_ATOL, rtol=0)

    reader = ShardReader(demo_shards)
    decoder = ViewDecoder([(TINY_RESOLUTION, "lanczos")], device="cpu", batch_size=8, color_jitter=True)
    pairs = cache.views(batch.keys, [reader.manifest.sizes[reader.index_of(k)] for k in batch.keys], 3)
    encoded = [reader.read(k) for k in batch.keys]
    (stored,) = decoder.decode(encoded, [v for _, v in pairs])
    assert torch.equal(stored, batch.teacher_images)  # the loader decoded the stored views
    other = lambda factor: 1.3 if factor < 1 else 0.7  # noqa: E731
    wrong = {"box": [replace(v, x=v.x + v.w // 4, y=v.y + v.h // 4, w=v.w // 2, h=v.h // 2) for _, v in pairs],
             "flip": [replace(v, flip=not v.flip) for _, v in pairs],
             "contrast": [replace(v, jitter=replace(v.jitter, contrast=other(v.jitter.contrast))) for _, v in pairs],
             "no jitter": [replace(v, jitter=NO_JITTER) for _, v in pairs]}
    for name, wrong_views in wrong.items():
        (images,) = decoder.decode(encoded, wrong_views)
        if name == "no jitter":
            assert (images - batch.teacher_images).abs().flatten(1).mean(1).min() > 0.005  # jitter was applied
        error = (teacher(images) - batch.targets).abs().flatten(1).amax(1)
        assert (error > 10 * FP16_TARGETS_ATOL).all(), (name, error)


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


def test_extraction_with_the_torch_loader_gives_the_same_views_and_close_targets(demo_cache, demo_shards,
                                                                                tiny_clip_checkpoint, tmp_path):
    """``loader="torch"`` (machines without DALI): the same views, targets from PIL's pixels close to DALI's."""
    extract_cache(ExtractConfig(shards=demo_shards, out=tmp_path, checkpoint=tiny_clip_checkpoint,
                                num_views=DEMO_CACHE_VIEWS, seed=DEMO_CACHE_SEED, color_jitter=DEMO_CACHE_JITTER,
                                batch_size=16, progress=False, loader="torch"))
    dali, pil = TeacherCache(demo_cache), TeacherCache(tmp_path)
    manifest = Manifest.load(demo_shards)
    keys = manifest.keys
    for epoch in (0, 1):
        pairs = pil.views(keys, manifest.sizes, epoch)
        assert pairs == dali.views(keys, manifest.sizes, epoch)
        view_ids = [view_id for view_id, _ in pairs]
        assert _cosine(pil.targets(keys, view_ids), dali.targets(keys, view_ids)) >= 0.99
    with pytest.raises(ValueError, match=r"loader \(--loader\) must be one of \('dali', 'torch'\), got 'pil'"):
        ExtractConfig(shards=demo_shards, out=tmp_path, checkpoint=tiny_clip_checkpoint, loader="pil")


def test_resume_skips_finished_files_and_refuses_other_settings(demo_cache, demo_shards, tiny_clip_checkpoint,
                                                                tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(demo_cache, out)
    (out / "shard-00001.arrow").unlink()
    cfg = ExtractConfig(shards=demo_shards, out=out, checkpoint=tiny_clip_checkpoint, num_views=DEMO_CACHE_VIEWS,
                        seed=DEMO_CACHE_SEED, batch_size=16, progress=False)
    assert [p.name for p in extract_cache(cfg)] == ["shard-00001.arrow"]
    assert extract_cache(cfg) == []
    for field, value in (("seed", 5), ("color_jitter", 0.2)):
        with pytest.raises(CacheError, match=rf"shard-00000.arrow: exists but was made differently \({field} differ"):
            extract_cache(replace(cfg, **{field: value}))


def test_extraction_stopped_after_every_forward_ends_byte_for_byte_as_an_uninterrupted_one(
        demo_cache, demo_shards, tiny_clip_checkpoint, tmp_path):
    """Preempted after each teacher forward (a shard's partial file continued, suspended and continued again)."""
    cfg = ExtractConfig(shards=demo_shards, out=tmp_path, checkpoint=tiny_clip_checkpoint, num_views=DEMO_CACHE_VIEWS,
                        seed=DEMO_CACHE_SEED, color_jitter=DEMO_CACHE_JITTER, batch_size=16, progress=False)
    stops = []
    while len(stops) < 20:
        polls = iter([False, False])  # before the shard, before one forward; then stop
        try:
            extract_cache(cfg, stop=lambda: next(polls, True))
            break
        except ExtractionPreempted as stopped:
            stops.append(str(stopped))
    assert sum(".arrow.partial keeps" in s for s in stops) >= 3, stops
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in demo_cache.iterdir())
    for path in demo_cache.glob("*.arrow"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_suspended_cache_file_is_continued_to_the_same_bytes(demo_cache, tmp_path, dtype):
    """Whole batches of the partial file copied, its short last batch filled up: the file equals one written
    without a stop."""
    meta = replace(open_cache_file(demo_cache / "shard-00000.arrow")[1], dtype=dtype, num_samples=7)
    k, generator = meta.num_views, torch.Generator().manual_seed(0)
    samples = [(f"key{i}", [sample_view(0, f"key{i}", v, 120, 90, color_jitter=0.4) for v in range(k)],
                torch.randn(k, meta.num_tokens, meta.dim, generator=generator)) for i in range(7)]

    def write(directory: Path, stops: tuple[int, ...]) -> bytes:
        path, done = directory / "shard-00000.arrow", 0
        for stop in (*stops, len(samples)):
            writer = CacheFileWriter(path, meta, samples_per_batch=2)
            assert writer.num_samples == done
            for sample in samples[done:stop]:
                writer.add(*sample)
            done = stop
            writer.suspend() if stop < len(samples) else writer.close()
        assert [p.name for p in directory.iterdir()] == [path.name]
        return path.read_bytes()

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert write(tmp_path / "a", (3, 4)) == write(tmp_path / "b", ())


def test_old_format_cache_replays_jitter_free_views_with_one_warning(demo_cache, demo_shards, tmp_path, caplog):
    old = _rewrite_as_version_1(demo_cache, tmp_path / "v1")
    current, manifest = TeacherCache(demo_cache), Manifest.load(demo_shards)
    with caplog.at_level(logging.WARNING, logger="itpn_ds.teacher.cache"):
        cache = TeacherCache(old, shards=demo_shards, color_jitter=0.4)
    warnings = [r.getMessage() for r in caplog.records if "format version 1" in r.getMessage()]
    assert len(warnings) == 1 and str(old) in warnings[0] and "jitter-free" in warnings[0]
    assert cache.meta.format_version == 1 and cache.color_jitter == 0.0
    keys, sizes = manifest.keys, manifest.sizes
    for (_, view), (_, stored) in zip(cache.views(keys, sizes, 2), current.views(keys, sizes, 2)):
        assert view == replace(stored, jitter=NO_JITTER)  # the same box and flip, no jitter
    assert torch.equal(cache.targets(keys, [1] * len(keys)), current.targets(keys, [1] * len(keys)))
    loader = build_pretrain_loader(demo_shards, views=cache, micro_batch=8, img_size=32, patch_size=8, device="cpu")
    assert loader.decoder.color_jitter is False


def test_refuses_a_cache_of_another_jitter_strength_or_layout(demo_cache, tmp_path):
    with pytest.raises(CacheError, match=r"drawn with colour jitter 0.4, the run has data.color_jitter=0.0"):
        TeacherCache(demo_cache, color_jitter=0.0)
    claims_version_2 = _rewrite_as_version_1(demo_cache, tmp_path / "no_jitter_column", version=2)
    with pytest.raises(CacheError, match=r"shard-00000.arrow: columns \[.*\], a format version 2 fp16 cache has"):
        TeacherCache(claims_version_2)


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
    assert f"shard-00001.tar: sample {reader.manifest.keys[bad]!r}: CRC32 of its JPEG differs" in err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shard-00000.arrow", "shard-00001.arrow.tmp"]

    assert cli_main([*args, "--teacher-checkpoint", str(tmp_path / "ViT-L-14.pt")]) == 2
    assert "ViT-L-14.pt not found: nothing is downloaded" in capsys.readouterr().err
    assert cli_main([*args, "--teacher-checkpoint", str(tiny_clip_checkpoint), "--color-jitter", "1.5"]) == 2
    assert "color_jitter (--color-jitter) must be in [0, 1) (0: off), got 1.5" in capsys.readouterr().err


def test_run_refuses_a_cache_drawn_with_another_crop_scale(demo_shards, demo_cache):
    """The cache defines the views: a run whose data.crop_scale differs from the cache's boxes stops."""
    from itpn_ds.config import ConfigError, load_config
    from itpn_ds.engine.tasks.pretrain import build_pretrain_loader

    overrides = ["task=pretrain", f"data.shards={demo_shards}", f"teacher.cache={demo_cache}",
                 f"teacher.resolution={TINY_RESOLUTION}", f"data.color_jitter={DEMO_CACHE_JITTER}",
                 "data.crop_scale=[0.2, 1.0]", "data.device=cpu"]
    with pytest.raises(ConfigError, match=r"crop scale \(0.08, 1.0\) but data.crop_scale is \(0.2, 1.0\)"):
        build_pretrain_loader(load_config("tiny_pretrain_cpu", overrides), rank=0, world_size=1)


def test_a_flipped_byte_in_a_cached_target_is_found_when_read(demo_cache, tmp_path):
    """Per-record CRC32: the damaged (key, view) is named when its targets are read; the others still read."""
    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    path = cache / "shard-00000.arrow"
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    batch = reader.get_batch(0)
    key, size = batch.column("key")[1].as_py(), batch.column("targets").type.list_size
    row = batch.column("targets").values.to_numpy(zero_copy_only=False)[size:2 * size].tobytes()  # view 1
    raw = bytearray(path.read_bytes())
    at = raw.find(row)
    assert at > 0 and raw.find(row, at + 1) < 0
    raw[at + len(row) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    damaged = TeacherCache(cache)
    with pytest.raises(CacheError, match=rf"shard-00000.arrow: sample {key!r} view 1: CRC32 of the record differs"):
        damaged.targets([key], [1])
    assert torch.equal(damaged.targets([key], [0]), TeacherCache(demo_cache).targets([key], [0]))
    TeacherCache(cache, verify=False).targets([key], [1])  # unchecked: what the check costs is measured so
