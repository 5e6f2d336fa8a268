"""``itpn-ds extract-teacher``: CLIP targets for K views per image into one Arrow file per shard.

Runs as one process or as many (torchrun / srun ranks, SLURM array tasks): each takes its share of the
shards; finished files are skipped, so re-running resumes (docs/teacher_cache.md). USR1 or SIGTERM (SLURM's
time-limit warning, a preemption) keeps the shard being written as a partial file and exits with
``PREEMPTED_EXIT_CODE``, on which launch/slurm/lib.sh requeues; the requeued run continues that shard.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from itpn_ds.errors import print_error_line
from itpn_ds.teacher.cache_format import DTYPES


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--shards", type=Path, required=True, help="shard directory (itpn-ds make-shards output)")
    parser.add_argument("--out", type=Path, required=True, help="cache directory to write (one .arrow per shard)")
    parser.add_argument("--teacher-checkpoint", type=Path, required=True,
                        help="local CLIP checkpoint: OpenAI ViT-L-14.pt, an OpenAI state dict or an open_clip file")
    parser.add_argument("--teacher-arch", default=None,
                        help="open_clip config name or model-config JSON (default: OpenAI format, read off the file)")
    parser.add_argument("--teacher-resolution", type=int, default=None,
                        help="teacher input px (default 196 for ViT-L-14, else the checkpoint's)")
    parser.add_argument("--num-views", type=int, default=8, help="K views per image (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="view seed; training replays the cache's views")
    parser.add_argument("--color-jitter", type=float, default=0.4,
                        help="colour-jitter strength of the views (brightness, contrast, saturation), in [0, 1), "
                             "0: off (default 0.4, the published recipe; training's data.color_jitter must match)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="stored target type (int8: per-token scale)")
    parser.add_argument("--batch-size", type=int, default=256, help="views per teacher forward")
    parser.add_argument("--device", default="auto", help="auto (the rank's GPU when CUDA is present), cpu, cuda")
    parser.add_argument("--num-threads", type=int, default=4, help="decoding threads")
    parser.add_argument("--loader", choices=("dali", "torch"), default="dali",
                        help="decoder: dali (default) or torch (PIL, for machines without DALI; train with "
                             "data.loader=torch on such a cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Exit 0 when this worker's files are written, ``PREEMPTED_EXIT_CODE`` when a signal stopped it (its
    partial shard kept), 2 with a message naming the file / sample otherwise."""
    from itpn_ds.engine.preemption import PREEMPTED_EXIT_CODE, PreemptionFlag

    preemption = PreemptionFlag()  # first: a signal during the imports and the teacher load is not lost
    from itpn_ds.data.shards import ShardError
    from itpn_ds.teacher.cache import CacheError
    from itpn_ds.teacher.clip import TeacherLoadError
    from itpn_ds.teacher.extract import ExtractConfig, ExtractionPreempted, extract_cache

    try:
        cfg = ExtractConfig(shards=args.shards, out=args.out, checkpoint=args.teacher_checkpoint,
                            arch=args.teacher_arch, resolution=args.teacher_resolution, num_views=args.num_views,
                            seed=args.seed, color_jitter=args.color_jitter, dtype=args.dtype,
                            batch_size=args.batch_size, device=args.device, num_threads=args.num_threads,
                            progress=not args.no_progress, loader=args.loader)
        written = extract_cache(cfg, stop=lambda: preemption.local)
    except ExtractionPreempted as exc:
        print(f"extract-teacher: preemption signal ({', '.join(preemption.received)}): {exc}; exiting "
              f"{PREEMPTED_EXIT_CODE} for a requeue", flush=True)
        return PREEMPTED_EXIT_CODE
    except (ShardError, CacheError, TeacherLoadError, ValueError) as exc:
        print_error_line(f"itpn-ds extract-teacher: {exc}")
        return 2
    finally:
        preemption.restore()
    print(f"extract-teacher: wrote {len(written)} cache file(s) into {cfg.out}")
    return 0
