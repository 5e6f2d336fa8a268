"""Cache size model against written files, and the ImageNet-1K figures docs/scaling.md quotes."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from itpn_ds.cli import main as cli_main
from itpn_ds.data.shards import Manifest
from itpn_ds.teacher.cache import TeacherCache
from itpn_ds.teacher.plan import plan_cache, plan_for_teacher, row_bytes


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
