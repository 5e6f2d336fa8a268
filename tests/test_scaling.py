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
    small = model_state_bytes(565, 2, 8, buffers=DeepSpeedBuffers())  # odd count: the engine's "auto" bucket
    assert small.comm_buffers == 2 * 566


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


# ---- the activation model against the bytes autograd really saves --------------------------------------------

TOLERANCE = 0.15
# Small real models from timm with the same block anatomy as iTPN's main blocks: ViT (fused CPU attention)
# and BEiT (relative position bias and layer scale; the bias needs a gradient, so the CPU takes the math path).
VALIDATION_MODELS = [
    ("vit_tiny_patch16_224", dict(img_size=96, embed_dim=128, depth=4, num_heads=4, init_values=0.1), 96, "cpu"),
    ("beit_base_patch16_224", dict(img_size=64, embed_dim=128, depth=4, num_heads=4, init_values=0.1), 64, "math"),
]


@pytest.mark.parametrize("name, kwargs, image_size, kernel", VALIDATION_MODELS, ids=[m[0] for m in VALIDATION_MODELS])
@pytest.mark.parametrize("policy", ["none", "every-2", "every"])
def test_activation_model_matches_measured_saved_bytes(name, kwargs, image_size, kernel, policy):
    import timm

    from itpn_ds.scaling.spec import example_forward, find_blocks, trace
    from itpn_ds.scaling.validate import checkpointed, saved_bytes

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1, **kwargs).train()  # fp32 on the CPU
    blocks, other, _ = trace(model, example_forward(model, image_size, batch=1))
    checkpoint = CheckpointPolicy.parse(policy)
    batch = 4
    forward = example_forward(model, image_size, batch=batch)
    with checkpointed([block for _, block in find_blocks(model)], checkpoint):
        measured = saved_bytes(model, lambda: forward().sum())
    modelled = activation_bytes(blocks, other, batch, checkpoint, dtype_bytes=4, kernel=kernel).saved
    assert abs(modelled - measured) <= TOLERANCE * measured, (modelled, measured)


def test_checkpointing_is_measured_not_assumed():
    """The measurement sees checkpointing: every block checkpointed saves far less than none."""
    import timm

    from itpn_ds.scaling.spec import example_forward, find_blocks
    from itpn_ds.scaling.validate import checkpointed, saved_bytes

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2).train()
    forward = example_forward(model, 64, batch=2)
    plain = saved_bytes(model, lambda: forward().sum())
    with checkpointed([block for _, block in find_blocks(model)], CheckpointPolicy(1)):
        every = saved_bytes(model, lambda: forward().sum())
    assert every < plain / 2
    assert not any("forward" in vars(block) for _, block in find_blocks(model))  # unwrapped afterwards


# ---- counts from the real module, and the CLI -------------------------------------------------------------

def test_spec_counts_equal_the_real_module():
    import timm

    from itpn_ds.scaling.spec import student_spec

    kwargs = dict(img_size=96, embed_dim=128, depth=3, num_heads=4)
    spec = student_spec("vit_tiny_patch16_224", 96, **kwargs)
    real = timm.create_model("vit_tiny_patch16_224", **kwargs)
    assert spec.n_params == sum(p.numel() for p in real.parameters())
    assert [b.tokens for b in spec.blocks] == [37] * 3  # 6 x 6 patches + class token
    assert spec.largest_block_params == sum(p.numel() for p in real.blocks[0].parameters())
    assert spec.recompute_flops(CheckpointPolicy(1)) == sum(b.forward_flops for b in spec.blocks)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from itpn_ds.cli import main

    code = main(["plan-scaling", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SMALL = ("--model", "vit_base_patch16_224", "--zero", "1", "3", "--checkpoint", "none", "every")


def test_cli_prints_a_table_and_writes_json(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    code, out, _ = run_cli(capsys, *SMALL, "--gpus", "64", "256", "--show", "all", "--json", str(out_json))
    assert code == 0
    assert "| GPUs | ZeRO | ckpt | micro |" in out
    import json

    rows = json.loads(out_json.read_text())["rows"]
    assert {r["gpus"] for r in rows} == {64, 256}
    for r in rows:
        assert r["global_batch"] == r["micro_batch"] * r["gpus"] * r["accum_steps"] == 2048
        assert r["steps_per_epoch"] == math.ceil(1_281_167 / 2048)
        assert r["fits"] == (r["bytes"]["total"] <= r["bytes"]["capacity"])


def test_cli_best_and_largest(capsys):
    code, out, _ = run_cli(capsys, *SMALL, "--gpus", "64", "--show", "best")
    plan, cache = out.split("Teacher cache reads")
    assert code == 0 and plan.count("| 64 |") == 1 and cache.count("| 64 |") == 1
    code, out, _ = run_cli(capsys, *SMALL, "--gpus", "64", "--show", "largest", "--gpu-memory-gib", "20")
    assert code == 0 and out.split("Teacher cache reads")[0].count("| 64 |") == 4  # one row per (stage, policy)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--model", "no_such_model_224"), "unknown model"),
        (("--gpus", "0"), "GPU count must be >= 1"),
        (("--gpus", "64", "--micro-batch", "3"), "divides the global batch"),
        (("--checkpoint", "sometimes"), "checkpoint policy"),
        (("--utilization", "1.5"), "utilization"),
    ],
)
def test_cli_rejects_bad_input_clearly(capsys, argv, message):
    code, _, err = run_cli(capsys, *SMALL, *argv)
    assert code == 2 and message in err


def test_plan_reads_the_registered_itpn_large_pretraining_model(capsys):
    code, out, _ = run_cli(capsys, "--model", "clip_tpn_large_2240_patch16_224", "--gpus", "64", "--show", "best")
    assert code == 0
    assert "307,452,904 params" in out  # REFERENCE.md's iTPN-L CLIP pre-training count
    assert "| 64 | " in out


def test_plan_states_the_cache_read_bandwidth_at_its_own_rate(capsys):
    """iTPN-L at 64 H100s: 60,980 images/s (953 per GPU, 7,622 per node of 8). One ViT-L-14 row is
    196 x 768 x 2 + 58 = 301,114 bytes fp16 and 196 x 768 + 4 x 196 + 58 = 151,370 bytes int8, so a node reads
    7,622 x 301,114 = 2.30 GB/s (fp16) / 1.15 GB/s (int8) and the 8 nodes 18.4 / 9.2 GB/s. The cache saves the
    teacher's 123.3 GFLOPs per image: 123.3e9 x 953 = 118 TFLOP/s per GPU, 30 % of 989 x 40 %."""
    code, out, _ = run_cli(capsys, "--model", "clip_tpn_large_2240_patch16_224", "--gpus", "64", "--show", "best")
    assert code == 0
    # the shards: 147.9 GB / 1,281,167 images = 115.4 KB per image (ImageNet-1K, assumed) x 7,622 = 0.88 GB/s
    assert "| 64 | 8 | 7,622 | 0.88 | 2.30 | 1.15 | 18.4 | 9.2 | 118 | 30% |" in out.split("Teacher cache reads")[1]
    code, out, _ = run_cli(capsys, "--model", "clip_tpn_large_2240_patch16_224", "--gpus", "64", "--show", "best",
                           "--teacher", "online")
    assert code == 0 and "Teacher cache reads" not in out  # no cache to read



def test_plan_refuses_blocks_outside_its_activation_model(capsys):
    """Fast-iTPN is traced with its mask (``flops.example_inputs``) and refused by name, not by a traceback:
    its conv-stage and SwiGLU blocks are not in the activation model."""
    code, _, err = run_cli(capsys, "--model", "fast_clip_tpn_tiny_1112_patch16_224", "--gpus", "8")
    assert code == 2
    assert "blocks.0 is a ConvMlpBlock with a ConvMlp" in err


def test_cli_plans_the_epoch_and_reads_of_a_real_shard_directory(capsys, tmp_path, demo_shards):
    """``--shards DIR``: the epoch is the manifest's 40 images (3 steps of 16) and the shards' read rate per node
    is its bytes per image at the row's rate; ``--train-images`` as well is refused in one line."""
    from itpn_ds.data.shards import ShardLayout

    out_json = tmp_path / "plan.json"
    code, out, _ = run_cli(capsys, *SMALL, "--gpus", "8", "--global-batch", "16", "--micro-batch", "2", "--show",
                           "best", "--shards", str(demo_shards), "--json", str(out_json))
    assert code == 0
    import json

    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["steps_per_epoch"] == 3 and "300 epochs of 40 images" in out
    layout = ShardLayout.of(demo_shards)
    assert f"40 images in {layout.shards} shards" in out
    cache_row = out.split("Teacher cache reads")[1].splitlines()[-1].split(" | ")
    assert cache_row[3] == f"{row['images_per_s'] * layout.bytes_per_image / 1e9:.2f}"  # one node of 8 GPUs
    code, _, err = run_cli(capsys, *SMALL, "--shards", str(demo_shards), "--train-images", "100")
    assert code == 2 and "drop --train-images" in err
