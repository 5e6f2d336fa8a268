"""`make demo`: the whole chain on a small real image set (photos shipped with scikit-image).

images (a training and a held-out split, ``data_tools.demo_images.make_demo_splits``) -> shards
(`make-shards`, `verify-shards`) -> CLIP targets for K views per image in an Arrow cache (`extract-teacher`)
-> iTPN pre-training from the cache on 2 CPU ranks with DeepSpeed ZeRO-2 (`pretrain`), watched by the k-NN
probe on the held-out split -> the same probe of its checkpoint and of a random initialisation (`probe`)
-> classifier fine-tuning from that checkpoint (`finetune`) -> evaluation (`evaluate`) -> one safetensors
file (`export`) that `timm.create_model` loads; both runs tracked in one MLflow store.

The held-out images come from the half of each photo that no training image was cropped from; they are
not sharded with the training images, so pre-training, the teacher cache and fine-tuning never see them.
Fine-tuning's periodic evaluation and `evaluate` run on them alone, and the demo reports the final
checkpoint's top-1 there next to the chance level (always predicting the held-out split's most frequent
class).

Without ``--teacher-checkpoint`` the teacher is a small CLIP with seeded random weights (the chain is real,
its targets carry no semantics); with OpenAI's ViT-L-14.pt the student is sized to its 14x14 token grid.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from data_tools.demo_images import make_demo_splits
from itpn_ds.data.shards import Manifest
from itpn_ds.teacher.clip import load_clip_teacher
from itpn_ds.teacher.random_clip import write_random_clip_checkpoint

RANKS = 2
STAGES = 9


def stage(number: int, title: str) -> None:
    print(f"\n=== [{number}/{STAGES}] {title}", flush=True)


def itpn_ds(*args: str, ranks: int = 1, capture: bool = False) -> str:
    """Run an ``itpn-ds`` subcommand (under torchrun when ``ranks`` > 1); the demo stops if it fails.
    With ``capture`` its stdout is also returned (and printed once it ends); otherwise ``""``."""
    launcher = [sys.executable, "-m", "itpn_ds.torchrun", "--nproc_per_node", str(ranks),
                "--master_port", "29531"] if ranks > 1 else [sys.executable]
    shown = f"python -m itpn_ds.torchrun --nproc_per_node {ranks} -m itpn_ds.cli" if ranks > 1 else "itpn-ds"
    print(f"$ {shown} " + " ".join(args), flush=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "itpn_ds.cli", *args], check=True, env=env, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if capture:
        print(done.stdout, end="", flush=True)
    return done.stdout or ""


def printed_metrics(stdout: str, first: str = "top1 ") -> dict[str, float]:
    """The metrics ``itpn-ds evaluate`` (or ``itpn-ds probe``) prints as its last line starting with ``first``
    (``name value`` pairs)."""
    lines = [line.split() for line in stdout.splitlines() if line.startswith(first)]
    if not lines:
        raise RuntimeError(f"itpn-ds printed no metrics line starting {first!r}:\n{stdout}")
    words = lines[-1]
    return {name: float(value) for name, value in zip(words[::2], words[1::2])}


def make_and_verify_shards(images: Path, shards: Path, *options: str) -> Manifest:
    itpn_ds("make-shards", str(images), str(shards), "--shard-size", "4", *options)
    itpn_ds("verify-shards", str(shards))
    return Manifest.load(shards)


def chance_top1(manifest: Manifest) -> float:
    """Top-1 (%) of always predicting the most frequent class of ``manifest``'s samples."""
    return 100 * max(manifest.labels.count(label) for label in set(manifest.labels)) / len(manifest)


def student_overrides(checkpoint: Path) -> list[str]:
    """Size the tiny student so its patch grid and output width match the teacher's tokens and dim."""
    teacher = load_clip_teacher(checkpoint, device="cpu")
    grid = math.isqrt(teacher.num_tokens)
    print(f"teacher: {teacher.num_tokens} tokens of dim {teacher.dim} at {teacher.resolution} px "
          f"-> student {grid * 16} px, teacher_dim {teacher.dim}")
    return [f"model.kwargs.img_size={grid * 16}", f"model.kwargs.teacher_dim={teacher.dim}",
            f"teacher.resolution={teacher.resolution}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--per-class", type=int, default=30, help="training images per class (8 classes)")
    parser.add_argument("--held-out-per-class", type=int, default=10, help="held-out images per class")
    parser.add_argument("--teacher-checkpoint", type=Path, help="local CLIP checkpoint, e.g. OpenAI's ViT-L-14.pt")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    images, shards, cache = out / "images", out / "shards", out / "teacher_cache"
    train_shards, held_out_shards = shards / "train", shards / "held_out"
    pretrain_dir, finetune_dir, export_dir = out / "runs" / "pretrain", out / "runs" / "finetune", out / "export"
    tracking = [f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "tracking.experiment=itpn-ds-demo"]

    stage(1, "images: scikit-image's photos, cropped and rescaled (one class per photo); training crops "
             "from each photo's left half, held-out crops from its right half")
    splits = make_demo_splits(images, args.per_class, args.held_out_per_class)
    for name, folder in (("training", splits.train), ("held-out", splits.held_out)):
        print(f"{name}: {sum(1 for _ in folder.rglob('*.jpg'))} images in {folder}")

    stage(2, "shards (WebDataset tar + DALI index + manifest), one directory per split")
    train_manifest = make_and_verify_shards(splits.train, train_shards)
    held_out_manifest = make_and_verify_shards(splits.held_out, held_out_shards, "--classes-from", str(train_shards))
    classes = train_manifest.num_classes

    stage(3, "CLIP targets for 4 views per image, into Arrow files")
    teacher = args.teacher_checkpoint or write_random_clip_checkpoint(out / "teacher" / "random_clip.pt",
                                                                      embed_dim=64)
    student = student_overrides(teacher)
    itpn_ds("extract-teacher", "--shards", str(train_shards), "--out", str(cache), "--teacher-checkpoint",
            str(teacher), "--num-views", "4")

    stage(4, f"iTPN pre-training from the cache: DeepSpeed ZeRO-2, {RANKS} CPU ranks; a k-NN probe of its "
             "features on the held-out images every 10 steps")
    k = min(20, args.per_class)  # DINO's k = 10 and 20, fewer where a class has fewer training images
    probe = [f"probe.train_shards={train_shards}", f"probe.val_shards={held_out_shards}",
             f"probe.ks=[{min(10, k)}, {k}]"]
    itpn_ds("pretrain", "--config", "tiny_pretrain_cpu", "--run-dir", str(pretrain_dir),
            f"data.shards={train_shards}", f"teacher.cache={cache}", *student, *tracking, *probe,
            "probe.every_steps=10", ranks=RANKS)

    stage(5, "the same k-NN probe of the pre-trained checkpoint and of the model at its random initialisation")
    knn = {name: printed_metrics(itpn_ds("probe", *source, *student, *probe, capture=True), "backbone_")
           for name, source in (("pre-trained", ["--checkpoint", str(pretrain_dir)]),
                                ("random init", ["--config", "tiny_pretrain_cpu"]))}
    for name, metrics in knn.items():
        print(f"k-NN (k={k}) top-1 on the held-out images, {name}: backbone {metrics[f'backbone_k{k}_top1']:.1f}%, "
              f"pyramid {metrics[f'pyramid_k{k}_top1']:.1f}%")

    stage(6, "fine-tuning a classifier from the pre-training checkpoint, same engine; evaluated on held-out")
    itpn_ds("finetune", "--config", "tiny_finetune_cpu", "--run-dir", str(finetune_dir),
            f"data.shards={train_shards}", f"data.val_shards={held_out_shards}", f"finetune.init={pretrain_dir}",
            f"finetune.num_classes={classes}", f"model.kwargs.num_classes={classes}", student[0], *tracking,
            ranks=RANKS)

    stage(7, "evaluation of the fine-tuned checkpoint on the held-out images")
    metrics = printed_metrics(itpn_ds(
        "evaluate", "--config", "tiny_finetune_cpu", "--checkpoint", str(finetune_dir),
        f"data.val_shards={held_out_shards}", f"finetune.num_classes={classes}",
        f"model.kwargs.num_classes={classes}", student[0], "tracking.enabled=false", capture=True))
    print(f"held-out top-1: {metrics['top1']:.1f}% on {int(metrics['samples'])} images never seen in training "
          f"({len(train_manifest)} training images, {classes} classes); chance: "
          f"{chance_top1(held_out_manifest):.1f}%")

    stage(8, "export: one safetensors file + JSON metadata, loadable by timm")
    itpn_ds("export", "--checkpoint", str(finetune_dir), "--out", str(export_dir))

    stage(9, "where everything is")
    print(f"shards:        {train_shards} (training)\n               {held_out_shards} (held out)\n"
          f"teacher cache: {cache}\nruns:          {pretrain_dir}\n               {finetune_dir}\n"
          f"exported:      {export_dir / 'model.safetensors'} (+ config.json)\n"
          f"MLflow store:  {out / 'mlflow.db'}\n"
          f"MLflow UI:     .venv/bin/mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --port 5000\n"
          f"load in timm:  timm.create_model('local-dir:{export_dir}', pretrained=True)  "
          f"(size, classes and weights from the folder; `import itpn_ds.models` first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
