"""The engine across ZeRO stages and objectives, 2 CPU ranks (real DeepSpeed, DALI, teacher cache), with the
tiny iTPN on the demo shards, in bf16 as the published recipes:

* ZeRO-1 and ZeRO-3 pre-training from the teacher cache lower the loss;
* ZeRO-3 holds about half of ZeRO-0's parameter + optimizer-state bytes per rank (measured from the tensors);
* a rank SIGKILLed mid-run resumes to bitwise-identical weights (iTPN + DALI + cache);
* a 2-rank ZeRO-1 checkpoint resumes on 1 rank under ZeRO-2 and continues the same run; ZeRO-3 is refused;
* the pixel objective and the online CLIP teacher train (one rank, in the test process: no rank is involved).
"""
import json
import re
from pathlib import Path

import pytest
import torch

from itpn_ds.engine.checkpoint import read_checkpoint
from itpn_ds.engine.export import consolidated_state_dict
from tests.fixtures.cli import (itpn_ds_in_process, losses_by_step, run_cli, run_in_process, step_metrics,
                                succeeded, zero3_config_partitioning_all)
from tests.fixtures.runs import copy_checkpoint

pytestmark = pytest.mark.dist
STEPS = 10  # 2 epochs of 40 images at 2 ranks x 4: no padding, so 1 rank x 4 x 2 micro-batches sees the same batches
GLOBAL_BATCH = "schedule.global_batch=8"  # 2 ranks x 4, or 1 rank x 4 x 2 accumulation steps
BF16 = "bf16"  # the published recipes' precision (the tiny recipes run fp32 on the CPU)
MICRO_BATCH = 4  # per rank
TEACHER_DIM = 32  # the tiny test teacher's embedding width (tests/fixtures/teacher.py)


def pretrain_args(run_dir: Path, shards: Path, cache: Path, *overrides: str, config: str = "tiny_pretrain_cpu",
                  precision: str = BF16) -> tuple[str, ...]:
    """The command line of the tiny CLIP pre-training from ``cache`` (tiny teacher: 16 tokens x 32), in bf16 unless
    ``precision`` says otherwise."""
    return ("pretrain", "--config", config, "--run-dir", str(run_dir), f"data.shards={shards}", f"teacher.cache={cache}",
            f"model.kwargs.teacher_dim={TEACHER_DIM}", f"data.micro_batch={MICRO_BATCH}", "schedule.epochs=2",
            "tracking.enabled=false", f"deepspeed.precision={precision}", *overrides)


def pretrain(run_dir: Path, shards: Path, cache: Path, *overrides: str, ranks: int = 2, config: str = "tiny_pretrain_cpu",
             precision: str = BF16):
    """``pretrain_args`` as processes (torchrun for several ranks); not checked."""
    return run_cli(*pretrain_args(run_dir, shards, cache, *overrides, config=config, precision=precision), ranks=ranks)


def assert_loss_falls(stdout: str, factor: float = 0.8) -> None:
    losses = losses_by_step(stdout)
    steps = sorted(losses)
    assert len(steps) >= 6, losses
    assert losses[steps[-1]] < factor * losses[steps[0]], losses


def state_mib(stdout: str) -> float:
    """Rank 0's parameter + optimizer-state MiB (the ``param_mib`` and ``optim_state_mib`` of its last step)."""
    last = step_metrics(stdout)[max(step_metrics(stdout))]
    return last["param_mib"] + last["optim_state_mib"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(read_checkpoint(run_dir))


def probe_args(shards) -> tuple[str, ...]:
    """The k-NN probe (engine/probe.py) at steps 5 and 10 on the demo probe shards, its bank sharded over the ranks."""
    return (f"probe.train_shards={shards.train}", f"probe.val_shards={shards.held_out}", "probe.ks=[5, 10]",
            "probe.every_steps=5")


def probes_by_step(stdout: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"probe at step (\d+): (.*) \(", stdout)}


@pytest.fixture(scope="module")
def zero1_run(demo_shards, demo_cache, demo_probe_shards, tmp_path_factory):
    """The reference: ZeRO-1, checkpoints at steps 5 and 10, the k-NN probe before each."""
    run_dir = tmp_path_factory.mktemp("zero1")
    out = succeeded(pretrain(run_dir, demo_shards, demo_cache, "deepspeed.config=zero1", "checkpoint.every_steps=5",
                             "checkpoint.keep_last=3", GLOBAL_BATCH, *probe_args(demo_probe_shards)))
    return run_dir, out


def test_one_rank_keeps_the_global_batch_of_two_by_accumulation_and_takes_the_same_steps(zero1_run, demo_shards,
                                                                                        demo_cache, tmp_path):
    _, ref_out = zero1_run
    out = succeeded(run_in_process(*pretrain_args(tmp_path, demo_shards, demo_cache, "deepspeed.config=zero1",
                                                   GLOBAL_BATCH, "schedule.max_steps=5")))
    assert "batch: global batch 8 = 4 per rank x 1 ranks x 2 accumulation steps" in out
    ref_losses, losses = losses_by_step(ref_out), losses_by_step(out)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert losses[1] == pytest.approx(ref_losses[1], rel=1e-5)  # same weights, same micro-batches
    for step, loss in losses.items():  # then the gradients' reduction order differs (bf16)
        assert loss == pytest.approx(ref_losses[step], rel=0.03), (step, losses, ref_losses)


def test_zero1_pretraining_from_the_cache_lowers_the_loss(zero1_run):
    _, out = zero1_run
    assert sorted(losses_by_step(out)) == list(range(1, STEPS + 1))
    assert_loss_falls(out)


def test_sigkilled_rank_resumes_itpn_with_dali_to_bitwise_identical_weights_and_probe_numbers(
        zero1_run, demo_shards, demo_cache, demo_probe_shards, tmp_path):
    ref_dir, ref_out = zero1_run
    args = ("deepspeed.config=zero1", "checkpoint.every_steps=5", "checkpoint.keep_last=3",
            *probe_args(demo_probe_shards))
    killed = pretrain(tmp_path, demo_shards, demo_cache, *args, "debug.kill_at_step=[1, 8]")
    assert killed.returncode != 0
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    resumed = succeeded(pretrain(tmp_path, demo_shards, demo_cache, *args))
    assert "resumed from" in resumed and sorted(losses_by_step(resumed)) == list(range(6, STEPS + 1))
    ref_losses = losses_by_step(ref_out)
    assert all(loss == ref_losses[step] for step, loss in losses_by_step(resumed).items())
    want, got = weights(ref_dir), weights(tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    reference, probed = probes_by_step(ref_out), probes_by_step(resumed)
    assert sorted(reference) == [5, 10] and sorted(probed) == [10]  # step 5's probe came before its checkpoint
    assert probed[10] == reference[10]
    best = read_checkpoint(tmp_path).meta["trainer"]["probe_best"]
    assert best and best == read_checkpoint(ref_dir).meta["trainer"]["probe_best"]


def test_two_rank_zero1_checkpoint_resumes_on_one_rank_under_zero2(zero1_run, demo_shards, demo_cache, tmp_path):
    ref_dir, ref_out = zero1_run
    copy_checkpoint(ref_dir, "step_00000005", tmp_path)
    out = succeeded(run_in_process(*pretrain_args(tmp_path, demo_shards, demo_cache, "deepspeed.config=zero2",
                                                   GLOBAL_BATCH)))
    assert "batch: global batch 8 = 4 per rank x 1 ranks x 2 accumulation steps" in out
    assert "loaded through the universal format at the same data position" in out
    ref_losses, losses = losses_by_step(ref_out), losses_by_step(out)
    assert sorted(losses) == list(range(6, STEPS + 1))
    for step, loss in losses.items():  # same batches; only the reduction order differs (bf16)
        assert loss == pytest.approx(ref_losses[step], rel=0.03), (step, losses, ref_losses)
    assert json.loads((tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())["world_size"] == 1


def test_resuming_a_zero1_checkpoint_under_zero3_is_refused_with_the_reason(zero1_run, demo_shards, demo_cache, tmp_path):
    ref_dir, _ = zero1_run
    copy_checkpoint(ref_dir, "step_00000005", tmp_path)
    # a process: a ZeRO-3 engine patches torch.nn.functional.linear for the rest of its process
    proc = pretrain(tmp_path, demo_shards, demo_cache, "deepspeed.config=zero3", GLOBAL_BATCH, ranks=1)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "written under ZeRO stage 1 and this run uses stage 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_zero3_lowers_the_loss_and_holds_half_of_zero0s_state_per_rank(demo_shards, demo_cache, tmp_path):
    zero3_json = zero3_config_partitioning_all(tmp_path)
    zero3 = succeeded(pretrain(tmp_path / "zero3", demo_shards, demo_cache, f"deepspeed.config={zero3_json}"))
    assert_loss_falls(zero3)
    # ZeRO-0 partitions nothing, so a rank holds the same bytes on 1 rank as on 2: one rank, in the test process
    zero0 = succeeded(run_in_process(*pretrain_args(tmp_path / "zero0", demo_shards, demo_cache,
                                                    "deepspeed.config=zero0", "schedule.max_steps=1")))
    ratio = state_mib(zero3) / state_mib(zero0)
    assert 0.45 < ratio < 0.6, (state_mib(zero3), state_mib(zero0))
    assert_classifier_initialises_from(tmp_path / "zero3")


def assert_classifier_initialises_from(run_dir: Path) -> None:
    """finetune.init from a ZeRO-3 run: the tiny classifier takes the backbone's consolidated fp32 weights."""
    import timm
    import yaml

    from itpn_ds.config import RECIPES_DIR
    from itpn_ds.engine.commands import init_from

    kwargs = yaml.safe_load((RECIPES_DIR / "tiny_finetune_cpu.yaml").read_text())["model"]["kwargs"]
    classifier = timm.create_model("itpn_base_3324_patch16_224", **kwargs)
    init_from(classifier, str(run_dir))
    pretrained = weights(run_dir)
    shared = [k for k in classifier.state_dict() if k in pretrained]
    assert len(shared) > 20 and "head.weight" not in shared
    for name in shared:
        assert torch.equal(classifier.state_dict()[name], pretrained[name]), name


def test_pixel_objective_lowers_its_loss(demo_shards, tmp_path):
    out = itpn_ds_in_process("pretrain", "--config", "tiny_pretrain_pixel_cpu", "--run-dir", str(tmp_path),
                             f"data.shards={demo_shards}", "schedule.epochs=3", "tracking.enabled=false")
    assert "loss_pixel" in out
    assert_loss_falls(out, factor=0.9)


def test_online_clip_teacher_trains_and_times_the_teacher(demo_shards, tiny_clip_checkpoint, tmp_path):
    out = itpn_ds_in_process("pretrain", "--config", "tiny_pretrain_cpu", "--run-dir", str(tmp_path),
                             f"data.shards={demo_shards}", "teacher.mode=online",
                             f"teacher.checkpoint={tiny_clip_checkpoint}", f"model.kwargs.teacher_dim={TEACHER_DIM}",
                             "schedule.epochs=3", "tracking.enabled=false")
    assert_loss_falls(out)
    assert all(m["targets_s"] > 0 for m in step_metrics(out).values())


def test_zero3_with_optimizer_offload_trains_with_deepspeed_cpu_adam(demo_shards, demo_cache, tmp_path):
    # one rank, a process (ZeRO-3 patches torch.nn.functional.linear for the rest of its process): the 2-rank ZeRO-3
    # runs are the test above and the compiled and EMA ones
    out = succeeded(pretrain(tmp_path, demo_shards, demo_cache, "deepspeed.config=zero3_offload",
                             "schedule.max_steps=3", ranks=1))
    assert "ZeRO stage 3, bf16, optimizer cpu_adam (DeepSpeedCPUAdam)" in out
    assert sorted(losses_by_step(out)) == [1, 2, 3]
