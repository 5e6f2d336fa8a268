"""The bad-input suite: each case builds one bad input from small real data, runs the ``itpn-ds`` subcommand
in this process through the CLI's one error boundary, and asserts exit code 2, one line
``itpn-ds COMMAND: ...`` on stderr holding the expected text, no traceback, and a run directory left as it
was (byte for byte where one existed, absent where none did). docs/troubleshooting.md lists the same cases.

The fault cases (a rank killed in training or in a checkpoint write, a tracking server dying mid-run) are
in test_engine_resume.py, test_engine_zero.py and test_tracking.py; the launcher cases in test_slurm.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pytest

from data_tools.dense_shapes import make_dense_shapes
from itpn_ds.cli import main as cli_main
from itpn_ds.data.shards import Manifest, ShardReader
from tests.fixtures.cli import PROJECT_TORCHRUN, RENDEZVOUS_ENV, free_port, run_cli

pytestmark = pytest.mark.dist


@dataclass
class Ws:
    """The case's workspace: good inputs to spoil and the paths a case names."""

    tmp: Path
    shards: Path
    cache: Path
    pretrain: Path  # a copy of a real tiny pre-training run directory
    images: Path
    clip: Path
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return self.tmp / "run"


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Ws], list[str]]
    expect: str
    watched: Callable[[Ws], Path] = lambda ws: ws.run  # the directory that must be left as it was
    setup: Callable[[Ws], None] = lambda ws: None


PRETRAIN = ["pretrain", "--config", "tiny_pretrain_cpu"]
FINETUNE = ["finetune", "--config", "tiny_finetune_cpu"]


def pretrain(ws: Ws, *overrides: str, run: Path | None = None) -> list[str]:
    return [*PRETRAIN, "--run-dir", str(run or ws.run), f"data.shards={ws.shards}", f"teacher.cache={ws.cache}",
            "model.kwargs.teacher_dim=32", "data.micro_batch=4", "tracking.enabled=false", *overrides]


def finetune(ws: Ws, *overrides: str, run: Path | None = None) -> list[str]:
    return [*FINETUNE, "--run-dir", str(run or ws.run), f"data.shards={ws.shards}", f"data.val_shards={ws.shards}",
            "tracking.enabled=false", "data.micro_batch=4", *overrides]


def detect(ws: Ws, *overrides: str, config: str = "tiny_detect_cpu") -> list[str]:
    return ["detect", "--config", config, "--run-dir", str(ws.run), f"data.shards={ws.extra['det_shards']}",
            "tracking.enabled=false", *overrides]


def segment(ws: Ws, *overrides: str, run: Path | None = None) -> list[str]:
    seg = ws.extra["seg_shards"]
    return ["segment", "--config", "tiny_segment_cpu", "--run-dir", str(run or ws.run), f"data.shards={seg}",
            f"data.val_shards={seg}", "tracking.enabled=false", *overrides]


def evaluate(ws: Ws, checkpoint: Path, *overrides: str) -> list[str]:
    return ["evaluate", "--config", "tiny_finetune_cpu", "--checkpoint", str(checkpoint),
            f"data.val_shards={ws.shards}", "tracking.enabled=false", *overrides]


# ------------------------------------------------------------------------------------------ spoilers

def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def copy_shards(ws: Ws, name: str) -> Path:
    out = ws.tmp / name
    shutil.copytree(ws.shards, out)
    return out


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def flip_byte_in_first_jpeg(shards: Path) -> None:
    reader = ShardReader(shards)
    loc = reader.locations[0]
    with open(shards / reader.manifest.shards[loc.shard].tar, "r+b") as tar:
        tar.seek(loc.offset + loc.size // 2)
        byte = tar.read(1)
        tar.seek(loc.offset + loc.size // 2)
        tar.write(bytes([byte[0] ^ 0xFF]))


def shift_index_offsets(shards: Path) -> None:
    index = shards / Manifest.load(shards).shards[0].index
    lines = index.read_text().splitlines()
    head, rows = lines[0], lines[1:]
    shifted = []
    for row in rows:
        words = row.split()
        words[1] = str(int(words[1]) + 512)
        shifted.append(" ".join(words))
    index.write_text("\n".join([head, *shifted]) + "\n")


def suspended_cache_file(ws: Ws, **changes) -> None:
    """``ws.run/shard-00000.arrow.partial``: a preempted extraction's file of the demo cache's first shard,
    made with ``changes`` to its settings."""
    from itpn_ds.teacher.cache import open_cache_file
    from itpn_ds.teacher.cache_format import CacheFileWriter

    ws.run.mkdir()
    meta = open_cache_file(ws.cache / "shard-00000.arrow")[1]
    CacheFileWriter(ws.run / "shard-00000.arrow", replace(meta, **changes)).suspend()


def image_folder_with_empty_class(ws: Ws) -> Path:
    root = ws.tmp / "images_empty_class"
    shutil.copytree(ws.images, root)
    (root / "zz_empty").mkdir()
    return root


def ds_json(ws: Ws, text: str) -> Path:
    return write(ws.tmp / "ds.json", text)


STAGE_IN_WORDS = json.dumps({"zero_optimization": {"stage": "three"}})


def pretrain_run_copy(ws: Ws) -> Path:
    return ws.pretrain


def checkpoint_dir(ws: Ws) -> Path:
    return ws.pretrain / "checkpoints" / (ws.pretrain / "checkpoints" / "latest").read_text().strip()


def classifier_export(out: Path, answer: int, classes: dict[str, int] | None) -> Path:
    """An export of the tiny fine-tuning recipe's classifier that answers class id ``answer`` for every image
    (its head's weights 0, its bias one-hot), storing the class map ``classes`` (None: none, as older exports)."""
    import torch

    from itpn_ds.config import load_config
    from itpn_ds.engine.model import build_model
    from itpn_ds.engine.export import model_metadata, write_export

    cfg = load_config("tiny_finetune_cpu", [])
    model = build_model(cfg)
    state = model.state_dict()
    state["head.weight"] = torch.zeros_like(state["head.weight"])
    state["head.bias"] = torch.nn.functional.one_hot(torch.tensor(answer), state["head.bias"].numel()).float() * 10
    stored = {"classes": classes} if classes is not None else {}
    metadata = model_metadata(cfg.model.name, cfg.model.kwargs, "finetune", None, 0, out, **stored)
    return write_export(state, metadata, out)


def class_map_inputs(root: Path, images: Path, shards: Path, shapes) -> dict[str, Path]:
    """The class-map cases' inputs: classification shards of the demo folder with one class folder renamed, of
    its last 2 classes only (as a folder and as a path,label table), classifiers that always answer 'rocket'
    (training id 3) with and without a stored map and one storing other names, and dense validation shards with
    one class renamed 'blob'."""
    out: dict[str, Path] = {}
    renamed = root / "renamed_images"
    shutil.copytree(images, renamed)
    (renamed / "rocket").rename(renamed / "rocket_renamed")
    subset = root / "subset_images"
    shutil.copytree(images, subset)
    for name in ("astronaut", "chelsea"):
        shutil.rmtree(subset / name)
    out["subset_table"] = table = write(root / "subset.csv", "path,label\n" + "".join(
        f"{path},{path.parent.name}\n" for path in sorted(subset.rglob("*.jpg"))))
    for name, source in (("renamed_shards", renamed), ("subset_shards", subset), ("subset_table_shards", table)):
        out[name] = root / name
        assert cli_main(["make-shards", str(source), str(out[name]), "--quiet"]) == 0
    classes = Manifest.load(shards).classes
    out["always_rocket"] = classifier_export(root / "always_rocket", classes["rocket"], classes)
    out["always_rocket_unmapped"] = classifier_export(root / "always_rocket_unmapped", classes["rocket"], None)
    out["other_classes"] = classifier_export(root / "other_classes", 3, {f"other_{i}": i for i in range(4)})
    names = write(root / "seg_names.txt", shapes.class_names.read_text().replace("circle", "blob", 1))
    out["seg_renamed"] = root / "seg_renamed"
    assert cli_main(["make-shards", str(shapes.images("training")), str(out["seg_renamed"]), "--kind", "segmentation",
                     "--annotations", str(shapes.annotations("training")), "--class-names", str(names),
                     "--reduce-zero-label", "--quiet"]) == 0
    coco = json.loads(shapes.coco("training").read_text())
    coco["categories"][0]["name"] = "blob"
    out["det_renamed"] = root / "det_renamed"
    assert cli_main(["make-shards", str(shapes.images("training")), str(out["det_renamed"]), "--kind", "detection",
                     "--annotations", str(write(root / "renamed.json", json.dumps(coco))), "--quiet"]) == 0
    return out


def top1(stdout: str) -> float:
    """The top-1 (%) that ``itpn-ds evaluate`` printed."""
    return float(stdout.split("top1 ", 1)[1].split()[0])


# ------------------------------------------------------------------------------------------ the cases

def detector_cases(config: str, model: str, suffix: str = "") -> list[Case]:
    """The detection task's bad inputs, for each detector (Mask R-CNN, Cascade Mask R-CNN): the same lines."""
    return [
        Case(f"classification shards for detection{suffix}", lambda ws: detect(ws, f"data.shards={ws.shards}", config=config),
             "holds classification shards; task=detect needs detection shards"),
        Case(f"segmentation shards for detection{suffix}",
             lambda ws: detect(ws, f"data.val_shards={ws.extra['seg_shards']}", config=config),
             "holds segmentation shards; task=detect needs detection shards"),
        Case(f"detector classes off the shards{suffix}", lambda ws: detect(ws, "model.kwargs.num_classes=81", config=config),
             f"has 4 categories but model {model} has num_classes=81 (the background included): set "
             "model.kwargs.num_classes=5"),
        Case(f"detection crop size range reversed{suffix}", lambda ws: detect(ws, "detect.crop_size=[120, 77]", config=config),
             "detect.crop_size must be [min, max] px with 1 <= min <= max, got [120, 77]"),
        Case(f"detector cast to bf16{suffix}", lambda ws: detect(ws, "deepspeed.precision=bf16", config=config),
             "task=detect with deepspeed.precision=bf16"),
        Case(f"evaluate a pre-training run as a detector{suffix}",
             lambda ws: ["evaluate", "--config", config, "--checkpoint", str(ws.pretrain),
                         f"data.val_shards={ws.extra['det_shards']}", "tracking.enabled=false"], "holds no ITPNMaskRCNN"),
        Case(f"detect with a validation category training lacks{suffix}",
             lambda ws: detect(ws, f"data.val_shards={ws.extra['det_renamed']}", config=config),
             "was not trained on ('blob'"),
        Case(f"unknown RoI head{suffix}", lambda ws: detect(ws, "model.kwargs.roi_head=sparse", config=config),
             "roi_head must be one of standard, cascade, got 'sparse'"),
    ]


CASES: list[Case] = [
    *detector_cases("tiny_detect_cpu", "mask_rcnn_itpn_base_3324"),
    *detector_cases("tiny_cascade_cpu", "cascade_mask_rcnn_itpn_base_3324", " (cascade)"),
    # --- configuration: recipe, overrides, keys, types, ranges
    Case("unknown recipe", lambda ws: ["pretrain", "--config", "no_such_recipe", "--run-dir", str(ws.run)],
         "no recipe named 'no_such_recipe'"),
    Case("missing recipe file", lambda ws: ["pretrain", "--config", str(ws.tmp / "r.yaml"), "--run-dir", str(ws.run)],
         "r.yaml does not exist"),
    Case("recipe not a mapping", lambda ws: ["pretrain", "--config", str(write(ws.tmp / "l.yaml", "- 1\n- 2\n")),
                                              "--run-dir", str(ws.run)], "a recipe must be a mapping"),
    Case("recipe not YAML", lambda ws: ["pretrain", "--config", str(write(ws.tmp / "b.yaml", "a: [1\n")),
                                         "--run-dir", str(ws.run)], "not valid YAML"),
    Case("override without =", lambda ws: pretrain(ws, "optim.lr"), "is not of the form key=value"),
    Case("unknown key", lambda ws: pretrain(ws, "optim.bogus=1"), "bogus"),
    Case("unknown section", lambda ws: pretrain(ws, "bogus.key=1"), "bogus"),
    Case("value into a value", lambda ws: pretrain(ws, "optim.lr.x=1"), "'lr' is a value, not a section"),
    Case("wrong type", lambda ws: pretrain(ws, "optim.lr=fast"), "optim.lr"),
    Case("negative lr", lambda ws: pretrain(ws, "optim.lr=-1e-3"), "optim.lr must be > 0"),
    Case("zero lr", lambda ws: pretrain(ws, "optim.lr=0"), "optim.lr must be > 0"),
    Case("negative weight decay", lambda ws: pretrain(ws, "optim.weight_decay=-0.1"), "optim.weight_decay"),
    Case("beta of 1", lambda ws: pretrain(ws, "optim.betas=[0.9,1.0]"), "optim.betas must be in [0, 1)"),
    Case("layer decay above 1", lambda ws: pretrain(ws, "optim.layer_decay=1.5"), "optim.layer_decay must be in (0, 1]"),
    Case("negative clip", lambda ws: pretrain(ws, "optim.clip_grad=-1"), "optim.clip_grad must be >= 0"),
    Case("micro-batch 0", lambda ws: pretrain(ws, "data.micro_batch=0"), "data.micro_batch must be >= 1"),
    Case("epochs 0", lambda ws: pretrain(ws, "schedule.epochs=0"), "schedule.epochs must be >= 1"),
    Case("mask ratio 1", lambda ws: pretrain(ws, "pretrain.mask_ratio=1.0"), "pretrain.mask_ratio must be in [0, 1)"),
    Case("unknown attention", lambda ws: pretrain(ws, "model.attention=fast"), "model.attention"),
    Case("unknown checkpointing policy", lambda ws: pretrain(ws, "model.grad_checkpointing=some"),
         "model.grad_checkpointing"),
    Case("unknown task", lambda ws: pretrain(ws, "task=bogus"), "task must be one of"),
    Case("unknown lr schedule", lambda ws: pretrain(ws, "optim.schedule=linear"), "optim.schedule must be one of"),
    Case("unknown model keyword", lambda ws: pretrain(ws, "model.kwargs.bogus=1"),
         "model.kwargs.bogus: not a keyword of ITPNClipDistill"),
    Case("unknown model name", lambda ws: pretrain(ws, "model.name=itpn_huge"), "itpn_huge"),
    Case("pixel objective on a CLIP model", lambda ws: pretrain(ws, "pretrain.objective=pixel"), "ITPNPixelMAE"),
    Case("flex attention on the CPU", lambda ws: pretrain(ws, "model.attention=flex"), "model.attention=flex"),
    # --- the DeepSpeed JSON
    Case("missing DeepSpeed JSON", lambda ws: pretrain(ws, f"deepspeed.config={ws.tmp / 'none.json'}"),
         "none.json does not exist"),
    Case("DeepSpeed JSON not JSON", lambda ws: pretrain(ws, f"deepspeed.config={ds_json(ws, '{stage: 2')}"),
         "is not valid JSON"),
    Case("DeepSpeed JSON with an unknown key",
         lambda ws: pretrain(ws, f"deepspeed.config={ds_json(ws, json.dumps({'zero_optimization': {'stage': 2, 'bogus_key': 1}}))}"),
         "bogus_key"),
    Case("DeepSpeed JSON precision disagrees",
         lambda ws: pretrain(ws, "deepspeed.precision=bf16",
                             f"deepspeed.config={ds_json(ws, json.dumps({'bf16': {'enabled': False}, 'zero_optimization': {'stage': 1}}))}"),
         "bf16.enabled is False but the run configuration gives True"),
    Case("DeepSpeed JSON stage disagrees", lambda ws: pretrain(ws, "deepspeed.zero_stage=3"),
         "zero_optimization.stage is 2 but the run asks for deepspeed.zero_stage=3"),
    # --- data
    Case("no shards given", lambda ws: [*PRETRAIN, "--run-dir", str(ws.run), f"teacher.cache={ws.cache}",
                                        "tracking.enabled=false"], "data.shards is empty"),
    Case("missing shard directory", lambda ws: pretrain(ws, f"data.shards={ws.tmp / 'nowhere'}"), "manifest not found"),
    Case("no teacher cache given", lambda ws: pretrain(ws, "teacher.cache="), "teacher.mode=cache needs teacher.cache"),
    Case("missing teacher cache", lambda ws: pretrain(ws, f"teacher.cache={ws.tmp / 'nocache'}"), "nocache"),
    Case("online teacher without checkpoint", lambda ws: pretrain(ws, "teacher.mode=online", "teacher.checkpoint="),
         "teacher"),
    Case("accumulation beyond an epoch", lambda ws: pretrain(ws, "schedule.grad_accum=1000"),
         "schedule.grad_accum=1000 is more than the"),
    Case("global batch not a multiple of the micro-batch", lambda ws: pretrain(ws, "schedule.global_batch=6"),
         "schedule.global_batch=6 is not a multiple of data.micro_batch=4"),
    Case("accumulation that disagrees with the global batch",
         lambda ws: pretrain(ws, "schedule.global_batch=8", "schedule.grad_accum=3"),
         "schedule.grad_accum=3 disagrees with schedule.global_batch=8 on 1 ranks"),
    Case("resume at another global batch", lambda ws: pretrain(ws, "data.micro_batch=8", run=ws.pretrain),
         "was trained at global batch 4 (1 ranks) but this run takes 8 per step", watched=lambda ws: ws.pretrain),
    Case("truncated shard in training", lambda ws: pretrain(ws, f"data.shards={ws.extra['truncated']}"),
         "shard-00000.tar"),
    Case("flipped byte met in training", lambda ws: pretrain(ws, f"data.shards={ws.extra['flipped']}",
                                                          "data.on_corrupt=raise", "teacher.mode=online",
                                                          f"teacher.checkpoint={ws.clip}"),
         "CRC32 of its JPEG differs from when it was written", watched=lambda ws: ws.extra["flipped"]),
    Case("index that does not match its tar", lambda ws: finetune(ws, f"data.shards={ws.extra['shifted']}",
                                                                 "data.on_corrupt=raise"),
         "the index does not match the tar", watched=lambda ws: ws.extra["shifted"]),
    Case("fine-tune on detection shards", lambda ws: finetune(ws, f"data.shards={ws.extra['det_shards']}"),
         "holds detection shards; task=finetune needs classification shards (itpn-ds make-shards IMAGES OUT)"),
    Case("evaluate a classifier on segmentation shards",
         lambda ws: ["evaluate", "--config", "tiny_finetune_cpu", "--checkpoint", str(ws.pretrain),
                     f"data.val_shards={ws.extra['seg_shards']}", "tracking.enabled=false"],
         "holds segmentation shards; task=finetune needs classification shards"),
    Case("segment on classification shards", lambda ws: segment(ws, f"data.shards={ws.shards}"),
         "holds classification shards; task=segment needs segmentation shards (itpn-ds make-shards IMAGES OUT "
         "--kind segmentation"),
    Case("segment class count differs from the shards", lambda ws: segment(ws, "segment.num_classes=5"),
         "has 4 classes but segment.num_classes=5: set segment.num_classes=4"),
    Case("segment model class count stated twice", lambda ws: segment(ws, "model.kwargs.num_classes=7"),
         "state the class count once, in segment.num_classes"),
    Case("segment crop not a multiple of the stride", lambda ws: segment(ws, "segment.crop_size=[48,64]"),
         "segment.crop_size=[48, 64] is not a multiple of the segmentation layout's coarsest stride 32"),
    Case("segment eval stride beyond its crop", lambda ws: segment(ws, "segment.eval_stride=[96,96]"),
         "must not exceed segment.eval_crop"),
    Case("segment one image per CPU rank", lambda ws: segment(ws, "data.micro_batch=1"),
         "needs at least 2 images per rank"),
    Case("segment with a classifier", lambda ws: segment(ws, "model.name=itpn_base_3324_patch16_224",
                                                          "model.kwargs={img_size: 64, embed_dim: 64, depth: 2}"),
         "task segment needs a segmentation model (upernet_*)"),
    Case("evaluate a pre-training run as a segmenter",
         lambda ws: ["evaluate", "--config", "tiny_segment_cpu", "--checkpoint", str(ws.pretrain),
                     f"data.val_shards={ws.extra['seg_shards']}", "tracking.enabled=false"],
         "holds no SegmentationModel"),
    Case("DeepSpeed JSON stage not a number",
         lambda ws: pretrain(ws, f"deepspeed.config={ds_json(ws, STAGE_IN_WORDS)}"),
         "zero_optimization.stage is 'three'; give 0, 1, 2 or 3"),
    # --- class maps: compared by name before any work
    Case("evaluate on a class training never had",
         lambda ws: evaluate(ws, ws.extra["always_rocket"], f"data.val_shards={ws.extra['renamed_shards']}"),
         "has 1 class(es) that"),
    Case("fine-tune with a validation class training lacks",
         lambda ws: finetune(ws, f"data.val_shards={ws.extra['renamed_shards']}"),
         "was not trained on ('rocket_renamed'"),
    Case("segment with a validation class training lacks",
         lambda ws: segment(ws, f"data.val_shards={ws.extra['seg_renamed']}"), "was not trained on ('blob'"),
    Case("make-shards with both a shard size and a shard count",
         lambda ws: ["make-shards", str(ws.images), str(ws.run), "--shard-size", "64", "--num-shards", "3"],
         "--shard-size and --num-shards both given"),
    Case("make-shards with more shards than images",
         lambda ws: ["make-shards", str(ws.images), str(ws.run), "--num-shards", "1000"],
         "--num-shards 1000 is more than the 40 input images"),
    Case("make-shards numbered as a missing list",
         lambda ws: ["make-shards", str(ws.images), str(ws.run), "--classes-from", str(ws.tmp / "nolist")],
         "no such shard directory or class-names file"),
    Case("make-shards numbered as detection shards",
         lambda ws: ["make-shards", str(ws.images), str(ws.run), "--classes-from", str(ws.extra["det_shards"])],
         "holds detection shards; give classification shards or a class-names file"),
    Case("make-shards numbered as another set for segmentation",
         lambda ws: ["make-shards", str(ws.images), str(ws.run), "--kind", "segmentation", "--annotations",
                     str(ws.images), "--classes-from", str(ws.shards)], "--classes-from is for classification shards"),
    # --- the k-NN probe: its shards checked before any work
    Case("probe without validation shards", lambda ws: pretrain(ws, f"probe.train_shards={ws.shards}"),
         "probe.val_shards is empty"),
    Case("probe validation shards of another class map",
         lambda ws: pretrain(ws, f"probe.train_shards={ws.shards}", f"probe.val_shards={ws.extra['renamed_shards']}",
                             "probe.ks=[3]"), "was not trained on ('rocket_renamed'"),
    Case("probe class with fewer images than k",
         lambda ws: pretrain(ws, f"probe.train_shards={ws.shards}", f"probe.val_shards={ws.shards}"),
         "has 10 image(s) (probe.max_per_class=50), fewer than k=20"),
    Case("probe on detection shards",
         lambda ws: pretrain(ws, f"probe.train_shards={ws.extra['det_shards']}", f"probe.val_shards={ws.shards}"),
         "holds detection shards; the probe needs labelled classification shards"),
    Case("probe bank beyond its bound",
         lambda ws: pretrain(ws, f"probe.train_shards={ws.shards}", f"probe.val_shards={ws.shards}", "probe.ks=[3]",
                             "probe.max_bank_mib=0.001"), "more than probe.max_bank_mib=0.001"),
    Case("probe with no neighbours", lambda ws: pretrain(ws, "probe.ks=[0]"), "probe.ks must be numbers of neighbours"),
    Case("probe command without shards", lambda ws: ["probe", "--config", "tiny_pretrain_cpu"],
         "itpn-ds probe needs probe.train_shards"),
    Case("labels beyond num_classes", lambda ws: finetune(ws, "finetune.num_classes=2", "model.kwargs.num_classes=2"),
         "set finetune.num_classes=4"),
    # --- run directory
    Case("run directory below a file", lambda ws: pretrain(ws, run=write(ws.tmp / "afile", "x") / "run"),
         "is a file, not a directory", watched=lambda ws: ws.tmp / "afile"),
    Case("run directory is a file", lambda ws: pretrain(ws, run=write(ws.tmp / "runfile", "x")),
         "is a file, not a directory", watched=lambda ws: ws.tmp / "runfile"),
    Case("resume=never over a run", lambda ws: pretrain(ws, "checkpoint.resume=never", run=ws.pretrain),
         "checkpoint.resume=never: choose a new --run-dir", watched=pretrain_run_copy),
    Case("another model over a run", lambda ws: pretrain(ws, "model.kwargs.depth=2", run=ws.pretrain),
         "holds checkpoints of another run", watched=pretrain_run_copy),
    Case("another task over a run", lambda ws: finetune(ws, run=ws.pretrain),
         "holds checkpoints of another run (task pretrain", watched=pretrain_run_copy),
    # --- checkpoints
    Case("missing finetune.init", lambda ws: finetune(ws, f"finetune.init={ws.tmp / 'nope'}"), "nope"),
    Case("finetune.init not a checkpoint", lambda ws: finetune(ws, f"finetune.init={write(ws.tmp / 'w.pth', b'junk')}"),
         "w.pth"),
    Case("finetune.init truncated safetensors", lambda ws: finetune(ws, f"finetune.init={ws.extra['truncated_export']}"),
         "model.safetensors"),
    Case("finetune.init truncated rank file", lambda ws: finetune(ws, f"finetune.init={ws.extra['truncated_ckpt']}"),
         "mp_rank_00_model_states.pt"),
    Case("evaluate a missing checkpoint", lambda ws: evaluate(ws, ws.tmp / "absent"), "absent"),
    Case("evaluate without val shards", lambda ws: evaluate(ws, ws.pretrain, "data.val_shards="),
         "evaluate needs data.val_shards"),
    Case("evaluate a pre-training checkpoint", lambda ws: evaluate(ws, ws.pretrain), "head.weight"),
    Case("export a missing checkpoint", lambda ws: ["export", "--checkpoint", str(ws.tmp / "absent"), "--out",
                                                    str(ws.run)], "absent"),
    Case("export to a file", lambda ws: ["export", "--checkpoint", str(ws.pretrain), "--out",
                                         str(write(ws.tmp / "out.txt", "keep"))], "out.txt",
         watched=lambda ws: ws.tmp / "out.txt"),
    Case("export with a corrupt meta.json", lambda ws: ["export", "--checkpoint", str(ws.extra["bad_meta"]), "--out",
                                                        str(ws.run)], "meta.json is corrupt"),
    # --- make-shards / verify-shards
    Case("make-shards of a missing folder", lambda ws: ["make-shards", str(ws.tmp / "nofolder"), str(ws.run)],
         "image folder not found"),
    Case("make-shards with an empty class folder",
         lambda ws: ["make-shards", str(image_folder_with_empty_class(ws)), str(ws.run)],
         "zz_empty: class folder without images"),
    Case("make-shards of a one-column table",
         lambda ws: ["make-shards", str(write(ws.tmp / "t.csv", "a.jpg\n")), str(ws.run)], "needs two columns"),
    Case("make-shards of an empty table", lambda ws: ["make-shards", str(write(ws.tmp / "e.csv", "")), str(ws.run)],
         "no rows"),
    Case("make-shards into a file", lambda ws: ["make-shards", str(ws.images), str(write(ws.tmp / "o.bin", "x"))],
         "o.bin", watched=lambda ws: ws.tmp / "o.bin"),
    Case("verify-shards without manifest", lambda ws: ["verify-shards", str(ws.tmp)], "manifest not found"),
    Case("verify-shards of a truncated shard", lambda ws: ["verify-shards", str(ws.extra["truncated"])],
         "truncated or replaced"),
    Case("verify-shards of a flipped byte", lambda ws: ["verify-shards", str(ws.extra["flipped"])],
         "sha256 does not match"),
    Case("verify-shards of a corrupt manifest", lambda ws: ["verify-shards", str(ws.extra["bad_manifest"])],
         "not a valid manifest"),
    # --- extract-teacher
    Case("extract-teacher without its checkpoint",
         lambda ws: ["extract-teacher", "--shards", str(ws.shards), "--out", str(ws.run), "--teacher-checkpoint",
                     str(ws.tmp / "ViT-L-14.pt"), "--no-progress"], "nothing is downloaded"),
    Case("extract-teacher of missing shards",
         lambda ws: ["extract-teacher", "--shards", str(ws.tmp / "noshards"), "--out", str(ws.run),
                     "--teacher-checkpoint", str(ws.clip), "--no-progress"], "manifest not found"),
    Case("extract-teacher of a truncated shard",
         lambda ws: ["extract-teacher", "--shards", str(ws.extra["truncated"]), "--out", str(ws.run),
                     "--teacher-checkpoint", str(ws.clip), "--no-progress"], "shard-00000.tar"),
    Case("extract-teacher continuing a partial file made with another seed",
         lambda ws: ["extract-teacher", "--shards", str(ws.shards), "--out", str(ws.run), "--teacher-checkpoint",
                     str(ws.clip), "--num-views", "2", "--no-progress"],
         "shard-00000.arrow.partial: a suspended extraction made differently (seed differ)",
         setup=lambda ws: suspended_cache_file(ws, seed=5)),
    # --- planners
    Case("plan-scaling of an unknown model", lambda ws: ["plan-scaling", "--model", "itpn_huge"], "itpn_huge"),
    Case("plan-cache for zero nodes", lambda ws: ["plan-cache", "--nodes", "0"], "--nodes >= 1"),
    Case("plan-cache of a directory without shards", lambda ws: ["plan-cache", "--shards", str(ws.tmp)],
         "manifest not found"),
]


# ------------------------------------------------------------------------------------------ running

@pytest.fixture(scope="module")
def inputs(demo_shards, demo_cache, demo_image_folder, tiny_clip_checkpoint, tiny_pretrain_run, tmp_path_factory):
    """Spoiled copies shared by the cases (each case only reads them)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    extra = {}
    extra["truncated"] = shards = root / "truncated"
    shutil.copytree(demo_shards, shards)
    truncate(shards / Manifest.load(shards).shards[0].tar)
    extra["flipped"] = shards = root / "flipped"
    shutil.copytree(demo_shards, shards)
    flip_byte_in_first_jpeg(shards)
    extra["shifted"] = shards = root / "shifted"
    shutil.copytree(demo_shards, shards)
    shift_index_offsets(shards)
    extra["bad_manifest"] = shards = root / "bad_manifest"
    shutil.copytree(demo_shards, shards)
    truncate(shards / "manifest.json", 0.6)
    from itpn_ds.engine.export import export_checkpoint

    export = Path(export_checkpoint(tiny_pretrain_run, root / "export"))
    truncate(export / "model.safetensors")
    extra["truncated_export"] = export
    extra["truncated_ckpt"] = ckpt_run = root / "truncated_ckpt"
    shutil.copytree(tiny_pretrain_run, ckpt_run)
    tag = (ckpt_run / "checkpoints" / "latest").read_text().strip()
    truncate(ckpt_run / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    shapes = make_dense_shapes(root / "shapes", 4, 1, seed=0, min_side=64, max_side=96)
    extra["det_shards"], extra["seg_shards"] = root / "det_shards", root / "seg_shards"
    assert cli_main(["make-shards", str(shapes.images("training")), str(extra["det_shards"]), "--kind", "detection",
                     "--annotations", str(shapes.coco("training")), "--quiet"]) == 0
    assert cli_main(["make-shards", str(shapes.images("training")), str(extra["seg_shards"]), "--kind", "segmentation",
                     "--annotations", str(shapes.annotations("training")), "--class-names", str(shapes.class_names),
                     "--reduce-zero-label", "--quiet"]) == 0
    extra["bad_meta"] = meta_run = root / "bad_meta"
    shutil.copytree(tiny_pretrain_run, meta_run)
    truncate(meta_run / "checkpoints" / tag / "meta.json")
    extra.update(class_map_inputs(root, demo_image_folder, demo_shards, shapes))
    return dict(shards=demo_shards, cache=demo_cache, images=demo_image_folder, clip=tiny_clip_checkpoint,
                pretrain=tiny_pretrain_run, extra=extra)


@pytest.fixture
def ws(inputs, tmp_path, monkeypatch) -> Ws:
    for name in RENDEZVOUS_ENV:
        monkeypatch.delenv(name, raising=False)  # each case starts clean (conftest puts them back afterwards)
    pretrain_copy = tmp_path / "pretrain_run"
    shutil.copytree(inputs["pretrain"], pretrain_copy)
    return Ws(tmp=tmp_path, shards=inputs["shards"], cache=inputs["cache"], pretrain=pretrain_copy,
              images=inputs["images"], clip=inputs["clip"], extra=inputs["extra"])


def snapshot(path: Path) -> dict[str, str] | None:
    """{relative path: sha256 (or "dir")} of everything under ``path``; None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def test_there_are_at_least_sixty_distinct_cases():
    assert len({c.name for c in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, ws, capsys):
    case.setup(ws)
    argv = case.argv(ws)
    watched = case.watched(ws)
    before = snapshot(watched)
    capsys.readouterr()
    code = cli_main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith(f"itpn-ds {argv[0]}: ")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and case.expect in lines[0], err[-3000:]
    assert snapshot(watched) == before, f"{watched} changed"


def test_debug_flag_keeps_the_traceback(ws, capsys):
    assert cli_main(["--debug", *pretrain(ws, "optim.lr=-1")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("optim.lr must be > 0, got -1.0")
    os.environ.pop("ITPN_DS_DEBUG")


def test_overrides_may_come_before_the_options(ws, capsys):
    argv = pretrain(ws, "optim.lr=-2")
    reordered = [argv[0], "optim.lr=-2", *argv[1:-1]]
    assert cli_main(reordered) == 2
    assert "optim.lr must be > 0, got -2.0" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    """The boundary reports only anticipated failures: anything else propagates as it is."""
    import itpn_ds.engine.commands as commands

    monkeypatch.setattr(commands, "load_config", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli_main(["pretrain", "--run-dir", "/tmp/unused"])


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(ws, caplog):
    """A truncated newest checkpoint (a full disk, a bad copy) is skipped, named; the one before it is used.
    The older checkpoint is a byte copy of the real one under an earlier tag."""
    from itpn_ds.engine.checkpoint import CheckpointError, CheckpointManager

    root = ws.pretrain / "checkpoints"
    newest = checkpoint_dir(ws)
    shutil.copytree(newest, root / "step_00000001")
    truncate(newest / "mp_rank_00_model_states.pt")
    manager = CheckpointManager(ws.pretrain, keep_last=2, rank=0, world_size=1)
    with caplog.at_level("WARNING"):
        assert manager.latest().tag == "step_00000001"
    assert f"skipping checkpoint {newest}" in caplog.text and "truncated or replaced" in caplog.text
    truncate(root / "step_00000001" / "rank00000.pt")
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        manager.latest()


def test_a_latest_pointer_naming_a_missing_checkpoint_is_said_in_one_warning(ws, caplog):
    """``checkpoints/latest`` names a checkpoint that is not on disk (deleted, a partial copy): the run resumes from
    the newest one that is, and one warning line says which, instead of switching silently."""
    from itpn_ds.engine.checkpoint import CheckpointManager

    newest = checkpoint_dir(ws)
    pointer = ws.pretrain / "checkpoints" / "latest"
    pointer.write_text("step_99999999\n")
    with caplog.at_level("WARNING"):
        assert CheckpointManager(ws.pretrain, keep_last=2, rank=0, world_size=1).latest().path == newest
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning == (f"{pointer} names step_99999999, which is not on disk: using {newest}, the newest checkpoint "
                       "that verifies")


# ------------------------------------------------------------------------------------------ class maps

@pytest.mark.parametrize("split", ["subset_shards", "subset_table_shards"], ids=["folder", "table"])
def test_a_split_of_fewer_classes_is_scored_by_name(split, ws, capsys, caplog):
    """The demo classifier forced to answer 'rocket' (training id 3) on a split of the last 2 classes, numbered
    0..1 by make-shards: by name 10 of its 20 images are right; by index it would be 0 %."""
    with caplog.at_level("INFO", logger="itpn_ds.engine"):
        assert cli_main(evaluate(ws, ws.extra["always_rocket"], f"data.val_shards={ws.extra[split]}")) == 0
    assert top1(capsys.readouterr().out) == pytest.approx(50.0)
    assert "holds 2 of the 4 classes of" in caplog.text and "it lacks 'astronaut', 'chelsea'" in caplog.text


def test_weights_without_a_class_map_are_scored_by_index_with_a_warning(ws, capsys, caplog):
    """An export made before class maps were stored: evaluated by label id as before (here wrongly: 0 %), with a
    warning that names the risk."""
    with caplog.at_level("WARNING", logger="itpn_ds.engine"):
        argv = evaluate(ws, ws.extra["always_rocket_unmapped"], f"data.val_shards={ws.extra['subset_shards']}")
        assert cli_main(argv) == 0
    assert top1(capsys.readouterr().out) == 0.0
    assert "stores no class map" in caplog.text and "evaluated by label id" in caplog.text


def test_make_shards_numbers_a_split_as_training_and_counts_other_classes_as_bad(ws, capsys):
    """``--classes-from TRAIN_SHARDS``: the split's labels are training's ids (the evaluation needs no mapping
    and scores as by name), and a row of a class training does not have is a counted bad input."""
    rows = ws.extra["subset_table"].read_text()
    first_image = rows.splitlines()[1].split(",")[0]
    table = write(ws.tmp / "val.csv", rows + f"{first_image},zebra\n")
    out = ws.tmp / "val_shards"
    argv = ["make-shards", str(table), str(out), "--classes-from", str(ws.shards), "--quiet"]
    assert cli_main([*argv, "--max-bad-fraction", "0.1"]) == 0
    manifest = Manifest.load(out)
    assert manifest.classes == Manifest.load(ws.shards).classes and sorted(set(manifest.labels)) == [2, 3]
    assert manifest.num_bad == 1 and "class 'zebra' is not in the class list of" in (out / "bad_files.tsv").read_text()
    assert cli_main(argv) == 2  # the default --max-bad-fraction: 1 of 21 is too many
    assert "1 of 21 inputs are bad" in capsys.readouterr().err
    assert cli_main(evaluate(ws, ws.extra["always_rocket"], f"data.val_shards={out}")) == 0
    assert top1(capsys.readouterr().out) == pytest.approx(50.0)


def test_the_class_map_travels_with_the_weights_and_other_classes_renew_the_head(ws, caplog):
    """Fine-tuning from a classifier of 4 other classes (the same head shape): its head starts again, said in a
    warning; the map trained is stored in meta.json, the export's config.json and the MLflow run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws.tmp / 'mlflow.db'}"
    argv = finetune(ws, f"finetune.init={ws.extra['other_classes']}", "data.val_shards=", "schedule.max_steps=1",
                    "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=classes")
    with caplog.at_level("INFO", logger="itpn_ds.engine"):
        assert cli_main(argv) == 0
    assert "was trained on other classes (4: 'other_0'" in caplog.text and "head is re-initialised" in caplog.text
    classes = Manifest.load(ws.shards).classes
    meta = json.loads((ws.run / "checkpoints" / (ws.run / "checkpoints" / "latest").read_text().strip()
                       / "meta.json").read_text())
    export = json.loads((ws.run / "export" / "config.json").read_text())
    assert meta["classes"] == export["classes"] == classes
    from safetensors.torch import load_file

    assert load_file(str(ws.run / "export" / "model.safetensors"))["head.bias"].abs().max() < 1  # not the init's 10
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("classes").experiment_id])
    assert run.data.params["classes.count"] == "4"
    assert "classes.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


# ------------------------------------------------------------------------------------------ whole processes

@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(options) -> a fresh tmpfs mounted with those options (e.g. "size=4800k", "ro"). Needs root (mount);
    skipped with the reason elsewhere, never under CI."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot mount a tmpfs for the file-system cases: {proc.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def small_disk(tmpfs):
    """4.8 MiB: room for the tiny model's checkpoint estimate (4.4 MiB), not for its checkpoint (5.3 MiB)."""
    return tmpfs("size=4800k")


def test_a_read_only_run_directory_is_refused(ws, tmpfs):
    run = tmpfs("ro,size=1m") / "run"
    proc = run_cli(*pretrain(ws, run=run), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("itpn-ds pretrain: ")]
    assert "is on a read-only file system: choose a writable directory" in line and "Traceback" not in proc.stderr


def test_too_little_free_space_is_refused_before_anything_is_written(ws, small_disk):
    run = small_disk / "run"
    proc = run_cli(*pretrain(ws, "model.kwargs.fpn_dim=64", run=run), timeout=300)  # a larger model: 6.1 MiB
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "a checkpoint of this model needs about" in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists()


def test_a_disk_filling_up_during_a_checkpoint_is_one_line_and_loses_nothing(ws, small_disk):
    run = small_disk / "run"
    proc = run_cli(*pretrain(ws, "schedule.max_steps=2", "checkpoint.every_steps=1", run=run), timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("itpn-ds pretrain: ")]
    assert "no space left on the device while saving a checkpoint" in line, line
    assert not (run / "checkpoints" / "latest").exists()  # nothing half-written was published


def test_a_taken_master_port_is_named(ws):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(*pretrain(ws), env={"MASTER_PORT": str(port)}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("itpn-ds pretrain: ")]
    assert f"cannot rendezvous at 127.0.0.1:{port}" in line and "set MASTER_PORT to a free one" in line
    assert not ws.run.exists()


def test_under_torchrun_every_rank_leaves_our_line_and_nothing_of_torchruns(ws):
    """itpn_ds.torchrun (what launch/local.sh and the tests start): two ranks refuse the same run, each prints
    its line, the launcher exits 2 without torchrun's ChildFailedError traceback."""
    proc = run_cli(*pretrain(ws, "model.kwargs.depth=2", run=ws.pretrain), ranks=2, timeout=300,
                   launcher=PROJECT_TORCHRUN)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("itpn-ds pretrain: ")]
    assert len(lines) == 2 and all("holds checkpoints of another run" in line for line in lines), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]


LOCAL_SH = Path(__file__).resolve().parents[1] / "launch" / "local.sh"


@pytest.mark.parametrize("args, expect", [
    (["bogus", "--", "pretrain"], "launch/local.sh torchrun  [-n NPROC]"),  # the usage
    (["torchrun", "-H", "hosts", "--", "pretrain"], "local.sh: -H is for the deepspeed launcher"),
    (["torchrun", "-n", "1"], "launch/local.sh torchrun  [-n NPROC]"),  # no command after --
    (["torchrun", "-n", "1", "--", "pretrain", "--config", "no_such_recipe", "--run-dir", "RUN"],
     "itpn-ds pretrain: no recipe named 'no_such_recipe'"),
], ids=["unknown launcher", "hostfile with torchrun", "no command", "bad recipe through torchrun"])
def test_the_local_launcher_refuses_in_one_line(args, expect, ws):
    argv = [str(ws.run) if a == "RUN" else a for a in args]
    env = {**os.environ, "ITPN_DS_PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(["bash", str(LOCAL_SH), *argv], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not ws.run.exists()


@pytest.mark.parametrize("knob", ["ITPN_DS_MAX_REQUEUES", "ITPN_DS_MAX_FAILURES"])
def test_a_requeue_bound_that_is_not_a_whole_number_is_refused_in_one_line(knob):
    """launch/slurm/lib.sh's environment check, as a one-task job's batch shell runs it (no step is started)."""
    env = {**os.environ, "ITPN_DS_PYTHON": sys.executable, knob: "three", "SLURM_NTASKS": "1"}
    proc = subprocess.run(["bash", "-c", f"source {LOCAL_SH.parent / 'slurm' / 'lib.sh'} && itpn_setup_env"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    (line,) = proc.stderr.splitlines()
    assert f"{knob}='three': set a whole number" in line, line


def test_a_multi_line_message_is_reported_on_one_line(monkeypatch, capsys):
    """Library messages wrapped into a user error (DALI's, pydantic's) span lines; the report never does."""
    import itpn_ds.engine.commands as commands
    from itpn_ds.errors import UserError

    def fail(*args, **kwargs):
        raise UserError("shard-00000.tar: sample 'k' cannot be decoded: Critical error in pipeline:\n  Error in\n thread 0")

    monkeypatch.setattr(commands, "load_config", fail)
    assert cli_main(["pretrain", "--run-dir", "/tmp/unused"]) == 2
    err = capsys.readouterr().err
    assert err == "itpn-ds pretrain: shard-00000.tar: sample 'k' cannot be decoded: Critical error in pipeline: Error in thread 0\n"


def test_the_report_reaches_stderr_in_one_write(monkeypatch):
    """Ranks share one stderr pipe and the launchers set PYTHONUNBUFFERED=1: a report written as text, then
    newline (``print``), let two ranks failing together join their lines into one (seen under torchrun)."""
    import io

    import itpn_ds.engine.commands as commands
    from itpn_ds.errors import UserError

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    def fail(*args, **kwargs):
        raise UserError("run/: holds checkpoints of another run: choose a new --run-dir")

    stderr = Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(commands, "load_config", fail)
    assert cli_main(["pretrain", "--run-dir", "/tmp/unused"]) == 2
    assert stderr.calls == ["itpn-ds pretrain: run/: holds checkpoints of another run: choose a new --run-dir\n"]
