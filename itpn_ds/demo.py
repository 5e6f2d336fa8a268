"""`make demo`: the chain on a small real image set (photos shipped with scikit-image), stage by stage.

Stages run today: demo images -> shards (`itpn-ds make-shards`) -> `itpn-ds verify-shards` -> a DALI
pre-training batch (view replay + block masks) -> one forward/backward of a small iTPN CLIP-distillation
model with activation checkpointing. The teacher cache, DeepSpeed pre-training/fine-tuning and MLflow stages
are added to this list as they are wired end to end (see README "Status").
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

import itpn_ds  # noqa: F401
from data_tools.demo_images import make_demo_image_folder
from itpn_ds.data import build_pretrain_loader
from itpn_ds.data.views import SampledViews
from itpn_ds.models import ITPNClipDistill

DEMO_MODEL = dict(img_size=112, patch_size=16, embed_dim=128, mlp_depth1=1, mlp_depth2=1, depth=4, num_heads=4,
                  fpn_dim=64, teacher_dim=64)


def stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run_cli(*args: str) -> None:
    """Run an ``itpn-ds`` subcommand in a child process, failing the demo if it fails."""
    cmd = [sys.executable, "-m", "itpn_ds.cli", *args]
    print("$ itpn-ds " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def model_smoke(shards: Path) -> None:
    """One DALI pre-training batch through a small iTPN, forward and backward."""
    loader = build_pretrain_loader(shards, SampledViews(seed=0), micro_batch=8, img_size=DEMO_MODEL["img_size"],
                                   seed=0)
    loader.set_epoch(0)
    batch = next(iter(loader))
    print(f"batch: images {tuple(batch.images.shape)}, mask {tuple(batch.bool_masked_pos.shape)} "
          f"({int(batch.bool_masked_pos[0].sum())} masked patches per image), views {batch.view_ids.tolist()}")
    model = ITPNClipDistill(**DEMO_MODEL)
    model.set_grad_checkpointing(True)
    start = time.perf_counter()
    main, aux = model(batch.images, batch.bool_masked_pos)
    (main.square().mean() + aux.square().mean()).backward()
    print(f"iTPN forward+backward: main {tuple(main.shape)}, aux {tuple(aux.shape)} "
          f"in {time.perf_counter() - start:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--teacher-checkpoint", help="local CLIP checkpoint (used once the cache stage is wired)")
    args = parser.parse_args(argv)
    images, shards = args.out / "images", args.out / "shards"
    stage("1/4 demo images from scikit-image's photos")
    make_demo_image_folder(images, images_per_class=args.per_class)
    print(f"{sum(1 for _ in images.rglob('*.jpg'))} images in {images}")
    stage("2/4 shards")
    run_cli("make-shards", str(images), str(shards), "--shard-size", "4")
    stage("3/4 verify shards")
    run_cli("verify-shards", str(shards))
    stage("4/4 DALI pre-training batch -> iTPN")
    model_smoke(shards)
    print(f"\ndone: shards in {shards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
