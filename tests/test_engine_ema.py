"""Weight EMA for fine-tuning: the average itself, then 2 ZeRO-3 ranks (every parameter partitioned) where the
EMA is evaluated, exported, and resumed bitwise from a mid-run checkpoint (the state a run killed after it leaves:
the SIGKILL itself is tests/test_engine_resume.py's and tests/test_engine_zero.py's)."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from itpn_ds.engine.checkpoint import read_checkpoint
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.export import consolidated_state_dict
from tests.fixtures.cli import run_cli, zero3_config_partitioning_all
from tests.fixtures.runs import copy_checkpoint


def test_ema_averages_swaps_in_and_restores_the_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightEma(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for name, p in model.named_parameters():
        assert torch.allclose(ema.shadow[name], 0.9 * start[name] + 0.1 * p, atol=1e-6)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():
        for name, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[name])
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name])


def test_ema_state_round_trips_and_a_mismatched_one_restarts_from_the_weights():
    model = nn.Linear(3, 2)
    ema = WeightEma(model, decay=0.5)
    ema.update()
    again = WeightEma(model, decay=0.5)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1 and all(torch.equal(again.shadow[k], ema.shadow[k]) for k in ema.shadow)
    other = WeightEma(nn.Linear(4, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 0 and other.shadow["weight"].shape == (2, 4)


def test_ema_decay_outside_the_open_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay must be in"):
        WeightEma(nn.Linear(2, 2), decay=1.0)


def finetune(run_dir, shards, zero3_json, *overrides):
    return run_cli("finetune", "--config", "tiny_finetune_cpu", "--run-dir", str(run_dir), f"data.shards={shards}",
                   f"data.val_shards={shards}", "finetune.ema_decay=0.8", f"deepspeed.config={zero3_json}",
                   "data.micro_batch=4", "schedule.epochs=2", "finetune.eval_every_epochs=1",
                   "checkpoint.every_steps=4", "checkpoint.keep_last=3", "data.rand_augment_ops=0",
                   "data.reprob=0", "tracking.enabled=false", *overrides, ranks=2)


@pytest.mark.dist
def test_zero3_ema_is_evaluated_exported_and_resumed_bitwise(demo_shards, tmp_path):
    zero3_json = zero3_config_partitioning_all(tmp_path)
    ref = finetune(tmp_path / "ref", demo_shards, zero3_json)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    assert "'ema_top1'" in ref.stdout
    averaged = load_file(tmp_path / "ref" / "ema" / "model.safetensors")
    trained = consolidated_state_dict(read_checkpoint(tmp_path / "ref"))
    assert averaged.keys() == trained.keys()
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)

    copy_checkpoint(tmp_path / "ref", "step_00000004", tmp_path / "resumed")  # before the first epoch's evaluation
    resumed = finetune(tmp_path / "resumed", demo_shards, zero3_json)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
    again = load_file(tmp_path / "resumed" / "ema" / "model.safetensors")
    for name in averaged:
        assert torch.equal(averaged[name], again[name]), name
