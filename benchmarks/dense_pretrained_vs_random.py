"""Do the dense heads gain from the pre-trained pyramid? UperNet, Mask R-CNN and Cascade Mask R-CNN fine-tuned on
the generated shapes once from a tiny CLIP pre-training and once from random init, the same steps on 2 CPU ranks,
for several seeds: the claim of docs/dense.md ("Proof on this machine"), measured with its spread.

* data: ``make_dense_shapes`` (``--train`` / ``--val`` images, 96-160 px, seed 0), sharded for pre-training, for
  segmentation (4 classes, ``--reduce-zero-label``) and for detection (COCO layout);
* pre-training: ``tiny_pretrain_cpu`` on the training images against the online tiny random CLIP teacher (56 px,
  patch 14: the 16 tokens of the 64 px student), ``--pretrain-epochs`` epochs of batches of 8 on one rank;
* fine-tuning: for every seed (``schedule.seed``: the heads' initialisation and the data order) and every head, one
  run from that pre-training (``segment.init`` / ``detect.init``) and one from random init, ``--epochs`` epochs on 2
  ranks (torch's torchrun); a head's figures are its run's last evaluation.

Prints, per head, every seed's figures and the paired gain (pre-trained minus random init) with its mean, its
smallest value and the number of seeds where it is positive; writes them to ``--out``. Exits 1 when a head's mean
gain in its main metric (mIoU, box AP) is not positive: the claim does not hold on this machine.

    python benchmarks/dense_pretrained_vs_random.py [--seeds 0 1 2] [--epochs 6] [--heads upernet,mask_rcnn,cascade]
                                                    [--work /tmp/dense_bench]
                                                    [--out benchmarks/results/dense_pretrained_vs_random.json]
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.dense_shapes import DenseShapes, make_dense_shapes  # noqa: E402
from itpn_ds.data.shards import SourceItem, write_shards  # noqa: E402
from itpn_ds.teacher.random_clip import write_random_clip_checkpoint  # noqa: E402
from tests.fixtures.cli import run_cli  # noqa: E402

TEACHER_DIM = 32
RUN_TIMEOUT_S = 3600  # one run, pre-training or fine-tuning
EVAL = re.compile(r"eval after epoch (\d+): (\{.*\})")


@dataclass(frozen=True)
class Head:
    """One dense head: its command (also the section of its ``init`` and ``eval_every_epochs`` keys), recipe, shard
    layout and the metrics reported (the first one decides)."""
    command: str
    recipe: str
    shards: str
    metrics: tuple[str, ...]


HEADS = {
    "upernet": Head("segment", "tiny_segment_cpu", "segmentation", ("mIoU",)),
    "mask_rcnn": Head("detect", "tiny_detect_cpu", "detection", ("bbox_AP", "bbox_AP75", "segm_AP")),
    "cascade": Head("detect", "tiny_cascade_cpu", "detection", ("bbox_AP", "bbox_AP75", "segm_AP")),
}


def itpn_ds(*args: str, ranks: int = 1) -> str:
    """``python -m itpn_ds.cli ARGS`` on the CPU (under torchrun for 2 ranks: ``tests.fixtures.cli.run_cli``); its
    stdout (it must succeed)."""
    done = run_cli(*args, ranks=ranks, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"itpn-ds {' '.join(args[:3])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def pretrain(shapes: DenseShapes, root: Path, epochs: int) -> Path:
    """The tiny CLIP pre-training on the shapes training images; its run directory."""
    images = sorted(shapes.images("training").glob("*.jpg"))
    write_shards([SourceItem(str(p), p.stem, 0) for p in images], root / "shards", {"shapes": 0}, "shapes",
                 progress=False)
    clip = write_random_clip_checkpoint(root / "clip.pt", resolution=56, patch=14, embed_dim=TEACHER_DIM)
    itpn_ds("pretrain", "--config", "tiny_pretrain_cpu", "--run-dir", str(root / "run"),
            f"data.shards={root / 'shards'}", "teacher.mode=online", f"teacher.checkpoint={clip}",
            f"model.kwargs.teacher_dim={TEACHER_DIM}", f"schedule.epochs={epochs}", "checkpoint.every_steps=0",
            "telemetry.log_every=50", "tracking.enabled=false")
    return root / "run"


def dense_shards(shapes: DenseShapes, root: Path, kind: str) -> dict[str, Path]:
    """Training and validation shards of the shapes in the segmentation or detection layout."""
    out = {}
    for split, name in (("training", "train"), ("validation", "val")):
        out[name] = root / f"{kind}_{name}"
        layout = (["--annotations", str(shapes.annotations(split)), "--class-names", str(shapes.class_names),
                   "--reduce-zero-label"] if kind == "segmentation" else ["--annotations", str(shapes.coco(split))])
        itpn_ds("make-shards", str(shapes.images(split)), str(out[name]), "--kind", kind, *layout, "--quiet")
    return out


def fine_tune(head: Head, shards: dict[str, Path], run_dir: Path, seed: int, epochs: int, init: Path | None
              ) -> dict[str, float]:
    """One fine-tuning run on 2 ranks, evaluated once at its end; the head's metrics."""
    init_arg = [f"{head.command}.init={init}"] if init else []
    out = itpn_ds(head.command, "--config", head.recipe, "--run-dir", str(run_dir), f"data.shards={shards['train']}",
                  f"data.val_shards={shards['val']}", f"schedule.epochs={epochs}", f"schedule.seed={seed}",
                  f"{head.command}.eval_every_epochs={epochs}", "tracking.enabled=false", *init_arg, ranks=2)
    found = EVAL.findall(out)
    if not found:
        raise RuntimeError(f"{head.recipe} printed no evaluation:\n{out[-3000:]}")
    metrics = ast.literal_eval(found[-1][1])
    return {name: float(metrics[name]) for name in head.metrics}


def summarise(head: Head, runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per metric: the paired gains' mean, smallest value and count of positive ones."""
    out = {}
    for name in head.metrics:
        gains = [run["pretrained"][name] - run["random_init"][name] for run in runs]
        out[name] = {"mean": statistics.fmean(gains), "min": min(gains), "positive": sum(g > 0 for g in gains),
                     "seeds": len(gains)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dense_bench"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (12 detection / 6 UperNet steps each)")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dense_pretrained_vs_random.json")
    args = parser.parse_args(argv)
    heads = {name: HEADS[name] for name in args.heads.split(",")}
    start = time.perf_counter()
    shapes = make_dense_shapes(args.work / "shapes", args.train, args.val, seed=0, min_side=96, max_side=160)
    pretraining = pretrain(shapes, args.work / "pretrain", args.pretrain_epochs)
    shards = {kind: dense_shards(shapes, args.work, kind) for kind in {head.shards for head in heads.values()}}
    results, failed = {}, []
    for name, head in heads.items():
        runs = []
        for seed in args.seeds:
            run = {"seed": seed}
            for init_name, init in (("pretrained", pretraining), ("random_init", None)):
                run[init_name] = fine_tune(head, shards[head.shards], args.work / name / f"{init_name}_{seed}", seed,
                                           args.epochs, init)
            runs.append(run)
            print(f"{name} seed {seed}: " + "; ".join(
                f"{m} {run['pretrained'][m]:.1f} pre-trained, {run['random_init'][m]:.1f} random init"
                for m in head.metrics), flush=True)
        gains = summarise(head, runs)
        results[name] = {"recipe": head.recipe, "runs": runs, "gain": gains}
        for metric, gain in gains.items():
            print(f"{name} {metric} gain: mean {gain['mean']:+.1f}, smallest {gain['min']:+.1f}, positive on "
                  f"{gain['positive']} of {gain['seeds']} seeds")
        if gains[head.metrics[0]]["mean"] <= 0:
            failed.append(name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs,
                                    "train_images": args.train, "val_images": args.val, "seeds": args.seeds,
                                    "seconds": time.perf_counter() - start, "heads": results}, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")
    if failed:
        print(f"the pre-trained pyramid does not gain on average for: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
