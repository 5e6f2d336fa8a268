"""Fast-iTPN CLIP pre-training through the CLI on the CPU, chained in one test to keep CPU time low:
tiny pre-training from the teacher cache on 2 DeepSpeed ranks -> a short run with the online teacher ->
the tiny Fast-iTPN classifier fine-tunes from the cached run with every backbone tensor loaded."""
import math

import pytest
import timm
import torch
import yaml

from itpn_ds.config import RECIPES_DIR
from itpn_ds.engine.commands import init_from
from tests.fixtures.cli import itpn_ds_cli, itpn_ds_in_process, step_metrics
from tests.test_engine_zero import assert_loss_falls, weights

pytestmark = pytest.mark.dist


def tiny_pretrain(run_dir, shards, *overrides: str, ranks: int = 1) -> str:
    """tiny_fast_pretrain_cpu against the tiny test teacher (16 tokens x 32), micro-batches of 4; several ranks as
    processes under torchrun, one rank in the test process."""
    args = ("pretrain", "--config", "tiny_fast_pretrain_cpu", "--run-dir", str(run_dir), f"data.shards={shards}",
            "model.kwargs.teacher_dim=32", "data.micro_batch=4", "tracking.enabled=false", *overrides)
    return itpn_ds_cli(*args, ranks=ranks) if ranks > 1 else itpn_ds_in_process(*args)


def test_fast_itpn_pretrains_from_the_cache_and_online_then_its_classifier_finetunes_from_it(
        demo_shards, demo_cache, tiny_clip_checkpoint, tmp_path):
    cached = tmp_path / "cached"
    assert_loss_falls(tiny_pretrain(cached, demo_shards, f"teacher.cache={demo_cache}", "schedule.epochs=2", ranks=2))

    online = step_metrics(tiny_pretrain(tmp_path / "online", demo_shards, "teacher.mode=online",
                                        f"teacher.checkpoint={tiny_clip_checkpoint}", "schedule.max_steps=2"))
    assert sorted(online) == [1, 2]
    assert all(m["targets_s"] > 0 and math.isfinite(m["loss"]) for m in online.values()), online

    out = itpn_ds_in_process("finetune", "--config", "tiny_fast_finetune_cpu", "--run-dir", str(tmp_path / "finetune"),
                             f"data.shards={demo_shards}", f"finetune.init={cached}", "schedule.max_steps=2",
                             "tracking.enabled=false")
    assert f"initialised FastITPN from {cached}" in out
    assert sorted(step_metrics(out)) == [1, 2]

    kwargs = yaml.safe_load((RECIPES_DIR / "tiny_fast_finetune_cpu.yaml").read_text())["model"]["kwargs"]
    classifier = timm.create_model("fast_itpn_tiny_1112_patch16_224", **kwargs)
    report = init_from(classifier, str(cached))
    backbone = [k for k in classifier.state_dict() if not k.startswith(("head.", "norm."))]
    assert len(backbone) > 50
    assert report.fresh == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert report.loaded == sorted(backbone) and not report.resized and not report.reinitialised
    pretrained = weights(cached)
    for name in backbone:
        assert torch.equal(classifier.state_dict()[name], pretrained[name]), name
