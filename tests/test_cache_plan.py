"""Cache size model against written files, and the ImageNet-1K figures docs/scaling.md quotes."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from itpn_ds.cli import main as cli_main
from itpn_ds.data.shards import Manifest, ShardLayout
from itpn_ds.teacher.cache import TeacherCache
import pytest

from itpn_ds.scaling.cache_plan import PLANNED_IMAGES_PER_S_PER_NODE, cache_reads, plan_cache, plan_for_teacher, row_bytes


def test_byte_model_matches_a_written_cache(demo_cache, demo_shards):
    cache, manifest = TeacherCache(demo_cache), Manifest.load(demo_shards)
    key_bytes = sum(len(k.encode()) for k in manifest.keys) / len(manifest)
    plan = plan_cache(len(manifest), cache.num_views, cache.meta.dtype, cache.meta.num_tokens, cache.meta.dim,
                      files=len(manifest.shards), key_bytes=round(key_bytes))
    paths = sorted(Path(demo_cache).glob("*.arrow"))
    written = sum(p.stat().st_size for p in paths)
    rows = plan.num_images * plan.num_views * plan.bytes_per_view
    assert rows <= written <= plan.total_bytes  # the model's row bytes are a floor, its overheads a ceiling
    # every column counted: the rows' Arrow buffers hold the modelled bytes, up to the last offset and bitmap
    # padding of each record batch
    readers = [pa.ipc.open_file(pa.memory_map(str(p))) for p in paths]
    buffers = sum(r.get_batch(i).nbytes for r in readers for i in range(r.num_record_batches))
    modelled = len(manifest) * cache.num_views * row_bytes(cache.meta.num_tokens, cache.meta.dim, "fp16", key_bytes)
    assert 0 <= buffers - modelled < 8 * sum(r.num_record_batches for r in readers)


def test_imagenet_clip_l_figures(capsys):
    fp16, int8 = plan_for_teacher("ViT-L-14", dtype="fp16"), plan_for_teacher("ViT-L-14", dtype="int8")
    assert 3.08e12 < fp16.total_bytes < 3.10e12  # 1,281,167 x 8 x 196 x 768 x 2 bytes + keys
    assert 0.50 < int8.total_bytes / fp16.total_bytes < 0.51
    assert cli_main(["plan-cache", "--teacher", "ViT-L-14"]) == 0
    assert "3.086TB" in capsys.readouterr().out


def test_read_bandwidth_per_node_and_cluster_at_the_planned_rate(capsys):
    """A ViT-L-14 row: 196 x 768 x 2 + 24 (key) + 4 + 2 + 16 + 1/8 + 12 + 4 (CRC32) = 301,118 bytes fp16 and
    196 x 768 + 4 x 196 + 62 = 151,374 bytes int8; at 7,622 images/s per node a node reads 7,622 x 301,118 =
    2.295 GB/s fp16 (1.154 GB/s int8) and 8 nodes 18.36 GB/s (9.23 GB/s). The teacher forward it saves:
    24 blocks x (2 x 197 x 1024 x (4 x 1024 + 2 x 4096) + 4 x 197^2 x 1024) + patch embed 2 x 196 x 588 x 1024
    + projection 2 x 196 x 1024 x 768 = 123.3 GFLOPs per image, x 7,622 = 0.940 PFLOP/s per node."""
    fp16, int8 = (cache_reads(plan_for_teacher("ViT-L-14", dtype=d), PLANNED_IMAGES_PER_S_PER_NODE, 8, "ViT-L-14")
                  for d in ("fp16", "int8"))
    assert (fp16.bytes_per_view, int8.bytes_per_view) == (301_118, 151_374)
    assert fp16.node_bytes_per_s == pytest.approx(7_622 * 301_118) and round(fp16.node_bytes_per_s / 1e9, 3) == 2.295
    assert round(int8.node_bytes_per_s / 1e9, 3) == 1.154
    assert round(fp16.cluster_bytes_per_s / 1e9, 2) == 18.36 and round(int8.cluster_bytes_per_s / 1e9, 2) == 9.23
    assert fp16.teacher_flops_per_image == pytest.approx(123.3e9, rel=1e-3)
    assert fp16.node_teacher_flops_per_s == pytest.approx(0.940e15, rel=1e-3)
    assert cli_main(["plan-cache", "--teacher", "ViT-L-14"]) == 0
    out = capsys.readouterr().out
    assert "2.30GB/s" in out and "18.36GB/s" in out and "0.94 PFLOP/s per node" in out
    with pytest.raises(ValueError, match="positive rate"):
        cache_reads(plan_for_teacher("ViT-L-14"), 0, 8)


def test_planned_node_rate_is_the_scaling_plans():
    """PLANNED_IMAGES_PER_S_PER_NODE is what plan-scaling gives iTPN-L on 64 H100s with cached targets."""
    from itpn_ds.scaling.memory import GPUS
    from itpn_ds.scaling.plan import Assumptions
    from itpn_ds.scaling.search import Grid, all_rows, best_rows
    from itpn_ds.scaling.activations import CheckpointPolicy
    from itpn_ds.scaling.spec import student_spec

    grid = Grid(gpus=[64], zero_stages=[2], checkpoints=[CheckpointPolicy.parse("none")], micro_batches=[32],
                global_batch=2048, online_teacher=False)
    (row,) = best_rows(all_rows(student_spec("clip_tpn_large_2240_patch16_224", 224), GPUS["h100-80gb"], grid,
                                Assumptions()))
    assert round(row.images_per_s / 8) == PLANNED_IMAGES_PER_S_PER_NODE


def test_plan_cache_reads_the_shard_layout_of_a_shard_directory(demo_shards, capsys):
    """``plan-cache --shards DIR``: images, files (one cache file per shard) and shard bytes from the manifest,
    not the ImageNet-1K assumption; with --images / --files as well, one error line."""
    manifest = Manifest.load(demo_shards)
    shard_bytes = sum(s.bytes for s in manifest.shards)
    assert cli_main(["plan-cache", "--shards", str(demo_shards), "--dtype", "fp16", "--num-views", "2",
                     "--node-images-per-s", "1000"]) == 0
    out = capsys.readouterr().out
    assert f"from {demo_shards}/manifest.json): 40 images in {len(manifest.shards)} shards" in out
    assert f"shards read at {1000 * shard_bytes / 40 / 1e9:.2f} GB/s per node" in out
    planned = plan_for_teacher("ViT-L-14", ShardLayout.of(demo_shards), num_views=2)
    assert planned.files == len(manifest.shards) == 3 and planned.num_images == 40
    assert f"{planned.total_bytes / 1e12:.3f}TB" in out
    assert cli_main(["plan-cache", "--shards", str(demo_shards), "--files", "1024"]) == 2
    assert "drop --images / --files" in capsys.readouterr().err


def test_without_shards_the_plan_assumes_imagenet_in_make_shards_default_shards(capsys):
    assert cli_main(["plan-cache", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "assumed: ImageNet-1K train in make-shards' default 1 GiB shards): 1,281,167 images in 138 shards" in out
