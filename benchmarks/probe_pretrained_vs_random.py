"""Does a pre-training teach the backbone something a k-NN probe sees? The probe (``itpn-ds probe``) of a tiny
pre-training against the same probe of the same model at its random initialisation, on two labelled sets:

* ``demo``: the demo's photos (``make_demo_splits``: class = the scikit-image photo a crop comes from), 8 classes,
  ``--demo-train`` training crops per class from the left halves, ``--demo-held-out`` held-out from the right;
* ``shapes``: ``make_dense_shapes`` images labelled by their dominant shape (the class with the most visible
  pixels), 4 classes, ``--shapes-train`` / ``--shapes-val`` images.

Each set: classification shards of both splits; ``tiny_pretrain_cpu`` pre-trained on the training images for
``--epochs`` epochs on 1 rank against the online tiny random CLIP teacher (as ``make demo`` without a teacher
checkpoint), with the in-run probe every ``--probe-every`` steps; then ``itpn-ds probe`` of the final
checkpoint and of the recipe's model at its initialisation (seed 0), both in fp32 on the CPU. The bank is the
training split (all of it: ``probe.max_per_class=0``), the queries the held-out one.

    python benchmarks/probe_pretrained_vs_random.py [--work /tmp/probe_bench] [--epochs 10]
                                                    [--out benchmarks/results/probe_pretrained_vs_random.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.demo_images import make_demo_splits  # noqa: E402
from data_tools.dense_shapes import SHAPES, make_dense_shapes  # noqa: E402
from itpn_ds.data.shards import SourceItem, write_shards  # noqa: E402
from itpn_ds.data.sources import image_folder_items  # noqa: E402
from itpn_ds.teacher.random_clip import write_random_clip_checkpoint  # noqa: E402

TEACHER_DIM = 32
PROBE_LINE = re.compile(r"probe at step (\d+): (.*) \(([\d.]+) s, ([\d.]+)% ")


def itpn_ds(*args: str) -> str:
    """``python -m itpn_ds.cli ARGS`` on the CPU, one rank; its stdout (it must succeed)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "itpn_ds.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"itpn-ds {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def demo_set(root: Path, train: int, held_out: int) -> tuple[Path, Path]:
    splits = make_demo_splits(root / "images", train, held_out, seed=0, min_side=96, max_side=200)
    out = []
    for name, folder in (("train", splits.train), ("held_out", splits.held_out)):
        items, classes = image_folder_items(folder)
        write_shards(items, root / name, classes, str(folder), progress=False)
        out.append(root / name)
    return out[0], out[1]


def dominant_shape(label_map: Path) -> int:
    """The shape class (0..K-1) with the most visible pixels of a label map (0 background, 1..K shapes)."""
    counts = np.bincount(np.asarray(Image.open(label_map)).ravel(), minlength=len(SHAPES) + 1)
    return int(counts[1:].argmax())


def shapes_set(root: Path, train: int, val: int) -> tuple[Path, Path]:
    shapes = make_dense_shapes(root / "shapes", train, val, seed=0, min_side=96, max_side=160)
    classes = {name: i for i, name in enumerate(SHAPES)}
    out = []
    for split, name in (("training", "train"), ("validation", "held_out")):
        items = [SourceItem(str(p), p.stem, dominant_shape(shapes.annotations(split) / f"{p.stem}.png"))
                 for p in sorted(shapes.images(split).glob("*.jpg"))]
        write_shards(items, root / name, classes, str(shapes.images(split)), progress=False)
        out.append(root / name)
    return out[0], out[1]


def printed(stdout: str) -> dict[str, float]:
    words = [line.split() for line in stdout.splitlines() if line.startswith("backbone_")][-1]
    return {name: float(value) for name, value in zip(words[::2], words[1::2])}


def measure(name: str, root: Path, train: Path, held_out: Path, clip: Path, args: argparse.Namespace) -> dict:
    probe = [f"probe.train_shards={train}", f"probe.val_shards={held_out}", "probe.max_per_class=0"]
    model = [f"model.kwargs.teacher_dim={TEACHER_DIM}"]
    run_dir = root / "run"
    start = time.perf_counter()
    log = itpn_ds("pretrain", "--config", "tiny_pretrain_cpu", "--run-dir", str(run_dir), f"data.shards={train}",
                  "teacher.mode=online", f"teacher.checkpoint={clip}", *model, f"schedule.epochs={args.epochs}",
                  "checkpoint.every_steps=0", "telemetry.log_every=50", "tracking.enabled=false", *probe,
                  f"probe.every_steps={args.probe_every}")
    run_s = time.perf_counter() - start
    curve = [{"step": int(m.group(1)), "probe": m.group(2), "seconds": float(m.group(3)), "run_share_pct":
              float(m.group(4))} for m in PROBE_LINE.finditer(log)]
    pretrained = printed(itpn_ds("probe", "--checkpoint", str(run_dir), *probe))
    random_init = printed(itpn_ds("probe", "--config", "tiny_pretrain_cpu", *model, *probe))
    return {"set": name, "pretrain_s": run_s,
            "in_run_probes": curve, "pretrained": pretrained, "random_init": random_init}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/probe_bench"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--demo-train", type=int, default=30)
    parser.add_argument("--demo-held-out", type=int, default=10)
    parser.add_argument("--shapes-train", type=int, default=160)
    parser.add_argument("--shapes-val", type=int, default=64)
    parser.add_argument("--sets", default="demo,shapes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "probe_pretrained_vs_random.json")
    args = parser.parse_args(argv)
    clip = write_random_clip_checkpoint(args.work / "teacher" / "random_clip.pt", embed_dim=TEACHER_DIM)
    makers = {"demo": lambda root: demo_set(root, args.demo_train, args.demo_held_out),
              "shapes": lambda root: shapes_set(root, args.shapes_train, args.shapes_val)}
    results = []
    for name in args.sets.split(","):
        root = args.work / name
        train, held_out = makers[name](root)
        result = measure(name, root, train, held_out, clip, args)
        results.append(result)
        print(f"{name}: pre-trained {args.epochs} epochs ({result['pretrain_s']:.0f} s)")
        for metric in sorted(result["pretrained"]):
            if metric != "seconds":
                print(f"  {metric:22s} pre-trained {result['pretrained'][metric]:6.2f}  random init "
                      f"{result['random_init'][metric]:6.2f}")
        for point in result["in_run_probes"]:
            print(f"  in-run probe at step {point['step']}: {point['probe']} ({point['seconds']:.1f} s, "
                  f"{point['run_share_pct']:.1f}% of the run)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"epochs": args.epochs, "load_avg_1min": os.getloadavg()[0],
                                    "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
