"""Step time and memory of `itpn-ds pretrain` by ZeRO stage and activation-checkpointing policy.

A small iTPN (CLIP-distillation model, ``--img-size`` px, embed ``--embed-dim``, ``--depth`` main blocks)
pre-trains from a teacher cache on ``--ranks`` CPU ranks (DS_ACCELERATOR=cpu, gloo) or GPUs, with each
combination of ``--stages`` x ``--policies`` as its own real run of the CLI. Reported per run: median step
time after ``--warmup`` steps, images/s, rank 0's peak memory (CUDA max allocated, else peak RSS, which
includes the libraries' ~1-2 GiB) and rank 0's parameter + optimizer-state MiB measured from the live
tensors (``itpn_ds.engine.memory``). The data (demo photos -> shards -> a cache of a random small CLIP
whose token grid matches the student) is made once under ``--work``.

    python benchmarks/engine.py [--stages 0 1 2 3] [--policies off every every2] [--steps 8]
                                [--out benchmarks/results/engine.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.cli import run_cli, step_metrics, zero3_config_partitioning_all  # noqa: E402

POLICIES = {"off": ("model.grad_checkpointing=off",),
            "every": ("model.grad_checkpointing=every",),
            "every2": ("model.grad_checkpointing=every_k", "model.checkpoint_every_k=2")}
TEACHER_PATCH = 14


def prepare(work: Path, images: int, img_size: int) -> tuple[Path, Path, int]:
    """(shards, teacher cache, teacher dim), made once per (images, img_size)."""
    from data_tools.demo_images import SOURCE_PHOTOS, make_demo_image_folder
    from itpn_ds.data.shards import MANIFEST_NAME, write_shards
    from itpn_ds.data.sources import image_folder_items, shuffled
    from itpn_ds.teacher.extract import ExtractConfig, extract_cache
    from itpn_ds.teacher.random_clip import write_random_clip_checkpoint

    teacher_dim = 64
    shards = work / f"shards-{images}"
    if not (shards / MANIFEST_NAME).is_file():
        folder = make_demo_image_folder(work / f"images-{images}", -(-images // len(SOURCE_PHOTOS)), min_side=160,
                                        max_side=320)
        items, classes = image_folder_items(folder)
        write_shards(shuffled(items, 0), shards, classes, str(folder), progress=False)
    cache = work / f"cache-{images}-{img_size}"
    if not cache.is_dir():
        resolution = img_size // 16 * TEACHER_PATCH  # the student's grid at the teacher's patch size
        clip = write_random_clip_checkpoint(work / f"clip-{resolution}.pt", resolution=resolution, patch=TEACHER_PATCH,
                                            embed_dim=teacher_dim)
        extract_cache(ExtractConfig(shards=shards, out=cache, checkpoint=clip, num_views=1, batch_size=32,
                                    progress=False))
    return shards, cache, teacher_dim


def run_one(args: argparse.Namespace, stage: int, policy: str, shards: Path, cache: Path, teacher_dim: int) -> dict:
    config = zero3_config_partitioning_all(args.work) if stage == 3 else "zero0" if stage == 0 else f"zero{stage}"
    run_dir = args.work / "runs" / f"zero{stage}-{policy}-{time.time_ns()}"
    model = {"img_size": args.img_size, "embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.embed_dim // 64,
             "mlp_depth1": 1, "mlp_depth2": 1, "fpn_dim": args.embed_dim // 2, "fpn_depth": 1, "teacher_dim": teacher_dim}
    resolution = args.img_size // 16 * TEACHER_PATCH
    proc = run_cli("pretrain", "--config", "tiny_pretrain_cpu", "--run-dir", str(run_dir), f"data.shards={shards}",
                   f"teacher.cache={cache}", f"teacher.resolution={resolution}",
                   *(f"model.kwargs.{k}={v}" for k, v in model.items()), f"data.micro_batch={args.micro_batch}",
                   f"schedule.max_steps={args.steps}", "schedule.epochs=100", f"deepspeed.config={config}",
                   f"deepspeed.precision={args.precision}", "checkpoint.every_steps=0", "tracking.enabled=false",
                   *POLICIES[policy], ranks=args.ranks, timeout=1800)
    if proc.returncode != 0:
        reasons = [line for line in proc.stderr.splitlines() if line.startswith("itpn-ds ")] or [proc.stderr[-3000:]]
        raise RuntimeError(f"zero{stage}/{policy} failed (run dir {run_dir}):\n" + "\n".join(reasons))
    steps = step_metrics(proc.stdout)
    timed = [m for s, m in steps.items() if s > args.warmup]
    step_s = statistics.median(m["step_s"] for m in timed)
    last = steps[max(steps)]
    return {"zero_stage": stage, "policy": policy, "step_s": step_s,
            "images_per_s": args.micro_batch * args.ranks / step_s, "peak_mem_gib": last["peak_mem_gib"],
            "state_mib": last["param_mib"] + last["optim_state_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=["off", "every", "every2"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--embed-dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/itpn_ds_bench_engine"))
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shards, cache, teacher_dim = prepare(args.work, args.images, args.img_size)
    rows = [run_one(args, stage, policy, shards, cache, teacher_dim) for stage in args.stages for policy in args.policies]
    print(f"{'ZeRO':>4} {'checkpointing':>13} {'step s':>8} {'images/s':>9} {'peak mem GiB':>13} {'params+optim MiB':>17}")
    for r in rows:
        print(f"{r['zero_stage']:>4} {r['policy']:>13} {r['step_s']:>8.3f} {r['images_per_s']:>9.1f} "
              f"{r['peak_mem_gib']:>13.2f} {r['state_mib']:>17.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "args": {
        k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
