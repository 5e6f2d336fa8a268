"""Pre-training -> segmentation, the whole chain on the CPU with real components (docs/dense.md, "Segmentation
fine-tuning"): the session's ``tiny_pretrain_run`` starts ``tiny_segment_cpu`` UperNet on 2 ZeRO-2 ranks (fp32) on
the ``dense_shapes`` images sharded for segmentation (4 classes, background ignored), tracked in MLflow; a run
resumed from its mid-run checkpoint ends bitwise the same (the SIGKILL itself is tests/test_engine_resume.py's); the export reads back through ``features_only`` and ``itpn-ds evaluate``.
Whether the pre-trained pyramid segments better than random init is measured, over seeds, by
``benchmarks/dense_pretrained_vs_random.py`` (docs/dense.md, "Pre-trained against random init (benchmark)")."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from itpn_ds.models import create_model
import itpn_ds.models  # noqa: F401 - registers the names
from itpn_ds.cli import main as cli_main
from itpn_ds.config import load_config
from itpn_ds.engine.model import build_model
from itpn_ds.engine.checkpoint import read_checkpoint
from itpn_ds.engine.export import consolidated_state_dict
from itpn_ds.models.loading import load_target, load_weights
from itpn_ds.models.pyramid import PYRAMID_PREFIXES
from tests.fixtures.cli import itpn_ds_cli, itpn_ds_in_process, losses_by_step, run_in_process
from tests.fixtures.runs import copy_checkpoint

pytestmark = pytest.mark.dist

SEG_EPOCHS = 6         # 6 steps of 2 x 4 images each
EVAL = re.compile(r"eval after epoch (\d+): (\{.*\})")


def segment_args(root: Path, run: str, *extra: str) -> list[str]:
    return ["segment", "--config", "tiny_segment_cpu", "--run-dir", str(root / run),
            f"data.shards={root / 'seg_train'}", f"data.val_shards={root / 'seg_val'}", f"schedule.epochs={SEG_EPOCHS}",
            "segment.eval_every_epochs=3", "checkpoint.every_steps=9", "checkpoint.keep_last=4", *extra]


def evals(stdout: str) -> dict[int, dict[str, float]]:
    return {int(epoch): ast.literal_eval(metrics) for epoch, metrics in EVAL.findall(stdout)}


@pytest.fixture(scope="module")
def chain(dense_shapes, tiny_pretrain_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("segment_e2e")
    for split, out in (("training", "seg_train"), ("validation", "seg_val")):
        assert cli_main(["make-shards", str(dense_shapes.images(split)), str(root / out), "--kind", "segmentation",
                         "--annotations", str(dense_shapes.annotations(split)), "--class-names",
                         str(dense_shapes.class_names), "--reduce-zero-label", "--quiet"]) == 0
    run = itpn_ds_cli(*segment_args(root, "pretrained", f"segment.init={tiny_pretrain_run}",
                                    f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "tracking.experiment=segment"),
                      ranks=2)
    return dict(root=root, pretrain=tiny_pretrain_run, run=run)


def test_upernet_from_a_pretraining_run_learns_the_shapes_and_reports_every_class(chain):
    got = evals(chain["run"])
    assert sorted(got) == [3, 6]
    assert re.search(r"initialised DenseITPN from \S+: .*dropped", chain["run"])
    print(f"mIoU after {SEG_EPOCHS} epochs: {got[6]['mIoU']:.1f}")
    assert got[6]["mIoU"] > 30  # chance is about 25 % IoU per class for 4 classes
    for name in ("circle", "rectangle", "triangle", "hexagon"):
        assert f"IoU/{name}" in got[6]


def test_pretraining_checkpoint_loads_with_every_pyramid_key_used(chain):
    model = build_model(load_config("tiny_segment_cpu", ["model.kwargs.num_classes=4"]))
    state = consolidated_state_dict(read_checkpoint(chain["pretrain"]))
    report = load_weights(load_target(model, state), state)
    pyramid = [k for k in state if k.startswith(PYRAMID_PREFIXES)]
    assert pyramid and not set(pyramid) & set(report.dropped)
    assert all(k.startswith(("block_16to8.1.", "block_8to4.1.")) for k in report.fresh), report.fresh  # fpn_depth 2


def test_best_mIoU_export_and_mlflow_per_class_curves(chain):
    from mlflow.tracking import MlflowClient

    best = json.loads((chain["root"] / "pretrained" / "best" / "config.json").read_text())
    assert best["metrics"]["mIoU"] == pytest.approx(max(m["mIoU"] for m in evals(chain["run"]).values()))
    assert best["task"] == "segment" and best["model_kwargs"]["num_classes"] == 4
    client = MlflowClient(f"sqlite:///{chain['root'] / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("segment").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["segment.eval_mode"] == "slide"
    assert len(client.get_metric_history(run.info.run_id, "eval/mIoU")) == 2
    for name in ("circle", "rectangle", "triangle", "hexagon"):
        assert len(client.get_metric_history(run.info.run_id, f"eval/IoU/{name}")) == 2


def test_segment_run_resumed_from_its_checkpoint_ends_with_bitwise_identical_weights(chain):
    """From step 9 of the chain's run (of 36; its first evaluation comes at step 18), as a run killed after that
    checkpoint resumes."""
    root = chain["root"]
    copy_checkpoint(root / "pretrained", "step_00000009", root / "resumed")
    resumed = itpn_ds_cli(*segment_args(root, "resumed", f"segment.init={chain['pretrain']}", "tracking.enabled=false"),
                          ranks=2)
    assert "resumed from" in resumed
    want, got = losses_by_step(chain["run"]), losses_by_step(resumed)
    assert sorted(got) == list(range(10, SEG_EPOCHS * 6 + 1))
    assert all(got[step] == want[step] for step in got)
    assert evals(resumed)[6]["mIoU"] == evals(chain["run"])[6]["mIoU"]
    ref = consolidated_state_dict(read_checkpoint(root / "pretrained"))
    again = consolidated_state_dict(read_checkpoint(root / "resumed"))
    assert ref.keys() == again.keys()
    for name in ref:
        assert torch.equal(ref[name], again[name]), name


def test_export_loads_back_as_features_only_and_evaluates_as_trained(chain):
    root = chain["root"]
    itpn_ds_in_process("export", "--checkpoint", str(root / "pretrained"), "--out", str(root / "export"))
    meta = json.loads((root / "export" / "config.json").read_text())
    file = str(root / "export" / "model.safetensors")
    features = create_model(meta["architecture"], features_only=True, pretrained=True,
                            pretrained_cfg_overlay=dict(file=file), **meta["model_kwargs"]).eval()
    full = create_model(meta["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=file),
                        **meta["model_kwargs"]).eval()
    assert features.feature_info.channels() == [48, 64, 96, 96]  # F + D/4, F + D/2, F + D, F + D
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for ours, theirs in zip(features(images), full.backbone(images)):
            assert torch.equal(ours, theirs)
    out = run_in_process("evaluate", "--config", "tiny_segment_cpu", "--checkpoint", str(root / "export"),
                         f"data.val_shards={root / 'seg_val'}", "tracking.enabled=false")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    miou = float(re.search(r"^mIoU ([0-9.]+)", out.stdout, re.MULTILINE).group(1))
    assert re.search(r"^IoU circle [0-9.]+, rectangle", out.stdout, re.MULTILINE)
    trained = evals(chain["run"])[SEG_EPOCHS]["mIoU"]  # the engine's evaluation, in the run's precision
    assert miou == pytest.approx(trained, abs=3.0), (miou, trained)
