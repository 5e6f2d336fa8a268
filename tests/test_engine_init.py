"""Fine-tuning from a real pre-training run: a tiny CLIP pre-training with layer scale (the CLI, 1 rank, 2 steps,
from the demo teacher cache at 64 px), then

* the classifier of ``tiny_finetune_cpu`` initialised from its checkpoint directory, its export and a ``.pth``
  laid out as the published pre-training code saves it (``finetune.init``), or refused with the fix;
* fine-tuning and evaluation at 96 px from the 64 px run (position embedding and bias tables resized);
* the evaluation crop that follows the model's input size."""
import argparse
import re
from pathlib import Path

import pytest
import torch

from itpn_ds.config import load_config
from itpn_ds.engine.model import build_model
from itpn_ds.engine.checkpoint import CheckpointError, read_checkpoint
from itpn_ds.engine.commands import init_from
from itpn_ds.engine.export import consolidated_state_dict, export_checkpoint
from itpn_ds.engine.tasks.classify import build_classification_loaders
from tests.fixtures.cli import itpn_ds_in_process, losses_by_step, run_in_process

@pytest.fixture(scope="module")
def pretrain_run(tiny_pretrain_run) -> Path:
    return tiny_pretrain_run


@pytest.fixture(scope="module")
def pretrained(pretrain_run) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(read_checkpoint(pretrain_run))


def published_pth(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """``{'model', 'optimizer', 'epoch', 'args'}`` as the published pre-training's ``save_model`` writes, with
    the ``module.`` prefix of a saved DDP wrapper."""
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 1,
                "args": argparse.Namespace(model="clip_tpn_base_3324_patch16_224")}, path)
    return path


def classifier(*overrides: str) -> torch.nn.Module:
    return build_model(load_config("tiny_finetune_cpu", ["task=finetune", *overrides]))


def source(kind: str, run_dir: Path, pretrained: dict[str, torch.Tensor], tmp_path: Path) -> str:
    if kind == "checkpoint":
        return str(run_dir)
    if kind == "export":
        return str(export_checkpoint(run_dir, tmp_path / "export"))  # the directory: model.safetensors + config.json
    return str(published_pth(tmp_path / "checkpoint-1.pth", pretrained))


@pytest.mark.parametrize("kind", ["checkpoint", "export", "pth"])
def test_classifier_takes_every_pretrained_gamma_and_only_its_head_is_new(kind, pretrain_run, pretrained, tmp_path):
    model = classifier()
    report = init_from(model, source(kind, pretrain_run, pretrained, tmp_path))
    assert report.fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "lm_head.weight" in report.dropped and "norm.weight" in report.dropped
    state = model.state_dict()
    gammas = sorted(k for k in state if ".gamma_" in k)
    assert len(gammas) == 10  # 2 MLP blocks (gamma_2) + 4 attention blocks (gamma_1, gamma_2)
    assert any(not torch.allclose(pretrained[k], torch.full_like(pretrained[k], 0.1)) for k in gammas)  # trained
    for name in gammas + [k for k in report.loaded if k not in gammas]:
        assert torch.equal(state[name], pretrained[name]), name


def test_recipe_without_layer_scale_is_refused_with_the_setting_in_one_line(pretrain_run, demo_shards):
    proc = run_in_process("finetune", "--config", "tiny_finetune_cpu", "--run-dir", str(pretrain_run.parent / "no_gamma"),
                          f"data.shards={demo_shards}", f"finetune.init={pretrain_run}", "model.kwargs.init_values=0",
                          "tracking.enabled=false")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("itpn-ds finetune: ")]
    assert "blocks.0.gamma_2" in line and line.endswith("add model.kwargs.init_values=0.1"), line
    assert "Traceback" not in proc.stderr


def test_published_pth_without_layer_scale_in_the_model_is_refused(pretrained, tmp_path):
    path = published_pth(tmp_path / "checkpoint-1.pth", pretrained)
    with pytest.raises(CheckpointError, match=r"checkpoint-1.pth: checkpoint does not fit ITPN: 10 checkpoint keys "
                                              r"the model lacks \(blocks.0.gamma_2.*add model.kwargs.init_values=0.1"):
        init_from(classifier("model.kwargs.init_values=0"), str(path))
    gammas_dropped = {k: v for k, v in pretrained.items() if ".gamma_" not in k}
    with pytest.raises(CheckpointError, match="the checkpoint has no layer scale: model.kwargs.init_values=0"):
        init_from(classifier(), str(published_pth(tmp_path / "no_gamma.pth", gammas_dropped)))


def test_evaluation_refuses_a_pretraining_checkpoint(pretrain_run):
    with pytest.raises(CheckpointError, match="leaves 4 keys of ITPN at their initialisation"):
        init_from(classifier(), str(pretrain_run), strict=True)


def test_finetuning_and_evaluation_at_another_resolution(pretrain_run, demo_shards, tmp_path):
    torch.use_deterministic_algorithms(False)  # the engine's setting for its process is not left to later tests
    finetuned = itpn_ds_in_process("finetune", "--config", "tiny_finetune_cpu", "--run-dir", str(tmp_path / "ft96"),
                                   f"data.shards={demo_shards}", f"finetune.init={pretrain_run}",
                                   "model.kwargs.img_size=96", "schedule.max_steps=2", "tracking.enabled=false")
    tables = ", ".join(f"blocks.{i}.attn.relative_position_bias_table" for i in range(4, 8))
    assert f"resized 5: absolute_pos_embed, {tables}" in finetuned
    assert sorted(losses_by_step(finetuned)) == [1, 2]
    assert not torch.are_deterministic_algorithms_enabled()
    evaluated = itpn_ds_in_process("evaluate", "--config", "tiny_finetune_cpu", "--checkpoint", str(tmp_path / "ft96"),
                                   f"data.val_shards={demo_shards}", "model.kwargs.img_size=96", "tracking.enabled=false")
    assert re.search(r"top1 [0-9.]+ top5 [0-9.]+", evaluated), evaluated[-2000:]


@pytest.mark.parametrize("img_size,stated,expected", [(96, None, 224 / 256), (384, None, 1.0), (384, 0.9, 0.9)])
def test_evaluation_crop_follows_the_model_size_unless_the_recipe_states_it(img_size, stated, expected, demo_shards):
    stated_crop = [f"data.crop_pct={stated}"] if stated else []
    cfg = load_config("tiny_finetune_cpu", ["task=finetune", f"data.val_shards={demo_shards}",
                                            f"model.kwargs.img_size={img_size}", *stated_crop])
    _, loader = build_classification_loaders(cfg, rank=0, world_size=1, train=False)
    assert loader.crop_pct == expected
