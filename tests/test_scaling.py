"""The scaling planner: ZeRO arithmetic, the activation model against measured saved tensors, the CLI."""
from __future__ import annotations

import math

import pytest
import torch

from itpn_ds.scaling.activations import BlockShape, CheckpointPolicy, OtherActivations, activation_bytes
from itpn_ds.scaling.memory import DeepSpeedBuffers, model_state_bytes, partition
from itpn_ds.scaling.plan import Config
from itpn_ds.scaling.throughput import collective_bytes_per_step


# ---- ZeRO partitioning ------------------------------------------------------------------------------------

def test_zero_stages_reproduce_the_zero_paper_figure_1():
    """7.5B parameters on 64 GPUs: 120 / 31.4 / 16.6 / 1.9 GB of model states (Rajbhandari et al., Fig. 1)."""
    psi, world = 7_500_000_000, 64
    no_buffers = DeepSpeedBuffers(reduce_bucket_elements=0, prefetch_bucket_elements=0)
    gigabytes = [
        (model_state_bytes(psi, stage, world, buffers=no_buffers).total) / 1e9 for stage in (0, 1, 2, 3)
    ]
    assert [round(g, 1) for g in gigabytes] == [120.0, 31.4, 16.6, 1.9]


def test_each_stage_partitions_exactly_its_own_states():
    n, world = 1001, 4
    shard = partition(n, world)
    assert shard == 251  # padded up, as DeepSpeed's flat buffers are
    states = {stage: model_state_bytes(n, stage, world, grad_bytes=4) for stage in (0, 1, 2, 3)}
    assert (states[0].params, states[0].grads, states[0].optimizer) == (2 * n, 4 * n, 12 * n)
    assert (states[1].params, states[1].grads, states[1].optimizer) == (2 * n, 4 * n, 12 * shard)
    assert (states[2].params, states[2].grads, states[2].optimizer) == (2 * n, 4 * shard, 12 * shard)
    assert (states[3].params, states[3].grads, states[3].optimizer) == (2 * shard, 4 * shard, 12 * shard)


def test_deepspeed_buffers_follow_the_stage():
    buffers = DeepSpeedBuffers(reduce_bucket_elements=100, overlap_comm=True, prefetch_bucket_elements=10)
    n = 10_000
    assert model_state_bytes(n, 0, 8, buffers=buffers).comm_buffers == 0
    assert model_state_bytes(n, 2, 8, buffers=buffers).comm_buffers == 2 * 100 * 2  # two bf16 buckets
    stage3 = model_state_bytes(n, 3, 8, largest_module_params=500, buffers=buffers)
    assert stage3.comm_buffers == 2 * 100 * 2 + 2 * (500 + 10)


@pytest.mark.parametrize("bad", [dict(stage=4), dict(world=0), dict(n_params=0)])
def test_model_states_reject_bad_input(bad):
    kwargs = dict(n_params=100, stage=1, world=2) | bad
    with pytest.raises(ValueError):
        model_state_bytes(**kwargs)


def test_collective_volume_per_stage():
    n, world, accum = 1000, 4, 3
    one_pass = 3 / 4 * 2 * n
    assert collective_bytes_per_step(n, 0, world, accum) == 2 * one_pass
    assert collective_bytes_per_step(n, 1, world, accum) == 2 * one_pass
    assert collective_bytes_per_step(n, 2, world, accum) == (accum + 1) * one_pass
    assert collective_bytes_per_step(n, 3, world, accum) == 3 * accum * one_pass
    assert collective_bytes_per_step(n, 3, 1, accum) == 0


# ---- configuration errors ------------------------------------------------------------------------------------

def test_checkpoint_policy_parses_and_selects_blocks():
    assert [CheckpointPolicy.parse("every-3").checkpoints(i) for i in range(7)] == [1, 0, 0, 1, 0, 0, 1]
    assert not any(CheckpointPolicy.parse("none").checkpoints(i) for i in range(5))
    assert str(CheckpointPolicy.parse("every")) == "every"
    for bad in ("every-0", "sometimes", "every-x"):
        with pytest.raises(ValueError, match="checkpoint policy"):
            CheckpointPolicy.parse(bad)


def test_config_rejects_zero_gpus_and_a_non_dividing_micro_batch():
    policy = CheckpointPolicy(0)
    with pytest.raises(ValueError, match="GPU count"):
        Config(0, 1, policy, 32, 2048, False)
    with pytest.raises(ValueError, match="not a multiple"):
        Config(64, 1, policy, 3, 2048, False)
    assert Config(64, 1, policy, 16, 2048, False).accum_steps == 2


# ---- activation model arithmetic --------------------------------------------------------------------------

def test_checkpointing_keeps_only_block_inputs_and_adds_one_recompute():
    block = BlockShape("b", "mlp", tokens=10, dim=4, hidden=12)
    blocks = [block] * 4
    none = activation_bytes(blocks, OtherActivations(0), 2, CheckpointPolicy(0), dtype_bytes=2)
    every = activation_bytes(blocks, OtherActivations(0), 2, CheckpointPolicy(1), dtype_bytes=2)
    per_block = 2 * (10 * (2 * 4 + 2 * 12) * 2 + 2 * 10 * 4)  # bf16 tensors + fp32 norm statistics
    assert none.saved == 4 * per_block and none.recompute == 0 and none.working == per_block
    assert every.saved == 4 * 2 * 10 * 4 * 2 and every.recompute == per_block
    assert math.isclose(none.peak, 5 * per_block)
