"""Teacher extraction: K views per sample -> CLIP targets -> one Arrow cache file per shard.

Views are drawn by ``sample_view(seed, key, view_id, width, height, color_jitter=...)`` (sizes from the
shard manifest) and decoded by the same DALI graph the pre-training pipeline replays them with
(``ViewDecoder``: box, colour jitter, lanczos resize to the teacher resolution), so cached targets come from
exactly the pixels training sees. Each row stores its view's box, flip and jitter factors. Without DALI,
``loader="torch"`` decodes with the torch loader's ``PILViewDecoder`` (the pixels ``data.loader=torch`` replays).

Work split: shard i goes to worker ``i % (tasks * world)``, a worker being (SLURM array task, rank):
``worker = task * world + rank``. A finished file (renamed from ``.tmp`` on completion) whose metadata
matches is skipped, so a requeued or re-submitted job only does what is left.

Preemption: ``stop()`` is asked after every teacher forward; once it says yes, the shard being written is kept
as ``NAME.arrow.partial`` (``CacheFileWriter.suspend``) and :class:`ExtractionPreempted` is raised. The next
run continues that shard from the next sample, and its finished file equals the one an uninterrupted run
writes, byte for byte.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm import tqdm

from itpn_ds.data.color_jitter import check_strength
from itpn_ds.data.shard_loader import BACKENDS
from itpn_ds.data.shards import Manifest, ShardError, ShardInfo, ShardReader
from itpn_ds.data.torch_loader import PILViewDecoder
from itpn_ds.data.view_decoder import ViewDecoder
from itpn_ds.data.views import CropView, sample_view
from itpn_ds.distributed import detect
from itpn_ds.teacher.cache import CacheError, open_cache_file
from itpn_ds.teacher.cache_format import CacheFileWriter, CacheMeta, cache_file_name
from itpn_ds.teacher.clip import ClipTeacher, load_clip_teacher

TEACHER_INTERP = "lanczos"


@dataclass
class ExtractConfig:
    """shards: ``make-shards`` output; out: cache directory; checkpoint/arch/resolution: the teacher
    (``load_clip_teacher``); num_views: K; seed: view seed (the cache's, replayed by training);
    color_jitter: the views' colour-jitter strength in [0, 1) (0: none; training's ``data.color_jitter``
    must match it); dtype: ``fp16`` or ``int8``; batch_size: views per teacher forward; device:
    ``auto``/``cpu``/``cuda``; loader: ``dali`` (``ViewDecoder``, the pixels the DALI loader replays) or ``torch``
    (``PILViewDecoder``, for machines without DALI: the torch loader's pixels)."""

    shards: Path
    out: Path
    checkpoint: Path
    arch: str | None = None
    resolution: int | None = None
    num_views: int = 8
    seed: int = 0
    color_jitter: float = 0.4
    dtype: str = "fp16"
    batch_size: int = 256
    device: str = "auto"
    num_threads: int = 4
    progress: bool = True
    loader: str = "dali"

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")
        if self.batch_size < self.num_views:
            raise ValueError(f"batch_size {self.batch_size} must hold at least one sample's {self.num_views} views")
        check_strength(self.color_jitter, "color_jitter (--color-jitter)")
        if self.loader not in BACKENDS:
            raise ValueError(f"loader (--loader) must be one of {BACKENDS}, got {self.loader!r}")


@dataclass(frozen=True)
class Worker:
    """This process's place among all extraction processes: (array task, rank) flattened."""

    index: int
    count: int

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> "Worker":
        env = os.environ if environ is None else environ
        dist = detect(env)
        task = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
        if not 0 <= task < tasks:
            raise ValueError(f"SLURM array task {task} outside 0..{tasks - 1} (SLURM_ARRAY_TASK_COUNT)")
        return cls(index=task * dist.world_size + dist.rank, count=tasks * dist.world_size)

    def owns(self, shard_number: int) -> bool:
        return shard_number % self.count == self.index


class ExtractionPreempted(Exception):
    """``stop()`` said yes: the shard being written is kept as a partial file for the next run."""


def extract_cache(cfg: ExtractConfig, worker: Worker | None = None, stop: Callable[[], bool] = lambda: False) -> list[Path]:
    """Write this worker's missing cache files; returns the files it wrote (skipped ones excluded).
    ``stop`` is polled after every teacher forward (a preemption flag); raises ``ExtractionPreempted``."""
    worker = worker or Worker.detect()
    device = _device(cfg.device)
    manifest = Manifest.load(cfg.shards)
    reader = ShardReader(cfg.shards, manifest)
    teacher = load_clip_teacher(cfg.checkpoint, arch=cfg.arch, resolution=cfg.resolution, device=device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    firsts = _first_indices(manifest)
    todo = [n for n, shard in enumerate(manifest.shards)
            if worker.owns(n) and not _finished(cfg.out / cache_file_name(shard.tar), _meta(cfg, teacher, shard))]
    decoder_cls = ViewDecoder if cfg.loader == "dali" else PILViewDecoder
    decoder = decoder_cls([(teacher.resolution, TEACHER_INTERP)], device="gpu" if device.type == "cuda" else "cpu",
                          batch_size=cfg.batch_size, num_threads=cfg.num_threads, color_jitter=cfg.color_jitter > 0)
    progress = tqdm(total=sum(manifest.shards[n].num_samples for n in todo), unit="img", unit_scale=True,
                    desc=f"teacher targets (worker {worker.index}/{worker.count})", disable=not cfg.progress)
    written = []
    for n in todo:
        if stop():
            raise ExtractionPreempted(f"stopped before {manifest.shards[n].tar}; {len(written)} file(s) written")
        shard = manifest.shards[n]
        indices = range(firsts[n], firsts[n] + shard.num_samples)
        written.append(_extract_shard(cfg, teacher, decoder, reader, shard, indices, progress, stop))
    progress.close()
    return written


def _extract_shard(cfg: ExtractConfig, teacher: ClipTeacher, decoder: ViewDecoder, reader: ShardReader,
                   shard: ShardInfo, indices: range, progress: tqdm, stop: Callable[[], bool]) -> Path:
    manifest, k = reader.manifest, cfg.num_views
    path = cfg.out / cache_file_name(shard.tar)
    per_step = cfg.batch_size // k
    with CacheFileWriter(path, _meta(cfg, teacher, shard)) as writer:
        progress.update(writer.num_samples)  # continued from a partial file
        for start in range(indices.start + writer.num_samples, indices.stop, per_step):
            if stop():
                partial = writer.suspend()
                raise ExtractionPreempted(f"stopped in {shard.tar}: {partial} keeps {writer.num_samples} of its "
                                          f"{shard.num_samples} samples")
            chunk = range(start, min(start + per_step, indices.stop))
            keys = [manifest.keys[i] for i in chunk]
            views = [[sample_view(cfg.seed, key, v, *manifest.sizes[i], color_jitter=cfg.color_jitter)
                      for v in range(k)] for i, key in zip(chunk, keys)]
            encoded = [reader.encoded(i) for i in chunk]
            images = _decode_views(decoder, encoded, views, keys, cfg.shards / shard.tar)
            targets = teacher(images.to(next(teacher.parameters()).device))
            for key, key_views, key_targets in zip(keys, views, targets.view(len(chunk), k, *targets.shape[1:])):
                writer.add(key, key_views, key_targets)
            progress.update(len(chunk))
    return path


def _decode_views(decoder: ViewDecoder, encoded: list[bytes], views: list[list[CropView]], keys: list[str],
                  shard_path: Path) -> torch.Tensor:
    """Teacher images (N*K, 3, R, R) in [0, 1] of N samples' K views each, sample-major.

    A JPEG DALI cannot decode fails the extraction with a ``ShardError`` naming the shard and the sample
    (found by decoding the batch's samples one by one, only after the batch failed)."""
    try:
        (images,) = decoder.decode([e for e, vs in zip(encoded, views) for _ in vs], [v for vs in views for v in vs])
        return images
    except RuntimeError as batch_error:
        for data, sample_views, key in zip(encoded, views, keys):
            try:
                decoder.decode([data], sample_views[:1])
            except RuntimeError as exc:
                raise ShardError(f"{shard_path}: sample {key!r} cannot be decoded (run `itpn-ds verify-shards`; "
                                 f"re-make the shard from its source image): {exc}") from exc
        raise batch_error


def _meta(cfg: ExtractConfig, teacher: ClipTeacher, shard: ShardInfo) -> CacheMeta:
    return CacheMeta(teacher=teacher.identity.as_dict(), dtype=cfg.dtype, num_views=cfg.num_views, seed=cfg.seed,
                     num_tokens=teacher.num_tokens, dim=teacher.dim, shard=shard.tar, shard_sha256=shard.sha256,
                     num_samples=shard.num_samples, interp=TEACHER_INTERP, color_jitter=cfg.color_jitter)


def _finished(path: Path, expected: CacheMeta) -> bool:
    """True for a complete file made the same way; a file made otherwise is refused (no silent mixing)."""
    if not path.exists():
        return False
    _, meta = open_cache_file(path)
    stale = meta.differences(expected)
    if stale:
        raise CacheError(f"{path}: exists but was made differently ({', '.join(stale)} differ); "
                         "delete it or choose another --out")
    return True


def _first_indices(manifest: Manifest) -> list[int]:
    firsts, total = [], 0
    for shard in manifest.shards:
        firsts.append(total)
        total += shard.num_samples
    return firsts


def _device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = detect().local_rank
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)
