"""Run configuration, DeepSpeed JSON resolution, parameter groups and schedules (no processes started)."""
import json
import math

import pytest
import torch
from torch import nn

from itpn_ds.config import ConfigError, RECIPES_DIR, load_config, save_config
from itpn_ds.engine.ds_config import auto_bucket_size, build_ds_config
from itpn_ds.engine.optim import build_optimizer, choose_optimizer, param_groups
from itpn_ds.engine.schedule import CosineSchedule, batch_plan


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_loads_and_resolves_against_its_deepspeed_json(recipe):
    cfg = load_config(recipe)
    ds = build_ds_config(cfg, world_size=8)
    assert ds["train_batch_size"] == (cfg.schedule.global_batch or cfg.data.micro_batch * 8)  # kept, or 1 step/rank
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    assert ds["bf16"]["enabled"] is (cfg.deepspeed.precision == "bf16")


def test_the_recipes_global_batch_is_kept_by_accumulation_on_any_world_size_that_divides_it():
    cfg = load_config("itpn_large_finetune")  # global batch 1024 = 16 per rank x 64 ranks
    for ranks, accum in ((64, 1), (32, 2), (8, 8), (1, 64)):
        plan = batch_plan(cfg, ranks)
        assert (plan.grad_accum, plan.global_batch) == (accum, 1024), ranks
        assert build_ds_config(cfg, ranks)["gradient_accumulation_steps"] == accum
    with pytest.raises(ConfigError, match=r"schedule.global_batch=1024 cannot be kept on 48 ranks of "
                                          r"data.micro_batch=16: .* world sizes that keep it: 1, 2, 4, 8, 16, 32, 64 "):
        batch_plan(cfg, 48)
    with pytest.raises(ConfigError, match="cannot be kept on 128 ranks"):  # fewer micro-batches than ranks
        batch_plan(cfg, 128)
    with pytest.raises(ConfigError, match="schedule.grad_accum=1 disagrees with schedule.global_batch=1024 on 32 ranks"):
        batch_plan(load_config("itpn_large_finetune", ["schedule.grad_accum=1"]), 32)
    legacy = load_config("tiny_pretrain_cpu", ["schedule.grad_accum=3"])  # no global batch: whatever the ranks give
    assert batch_plan(legacy, 2).global_batch == 8 * 3 * 2
    assert batch_plan(load_config("tiny_pretrain_cpu"), 5).describe() == (
        "global batch 40 = 8 per rank x 5 ranks x 1 accumulation steps")


def test_recipe_values_from_the_paper():
    base = load_config("itpn_base_clip_l_pretrain")
    assert (base.optim.lr, base.optim.betas, base.optim.weight_decay) == (1.5e-3, (0.9, 0.98), 0.05)
    large_ft = load_config("itpn_large_finetune")
    assert (large_ft.optim.lr, large_ft.optim.layer_decay, large_ft.model.drop_path_rate) == (2e-4, 0.55, 0.25)


def test_overrides_are_typed_and_dotted():
    cfg = load_config("tiny_pretrain_cpu", ["optim.lr=1e-3", "debug.inject_nan_at_steps=[3, 4]",
                                            "model.kwargs.depth=2", "deepspeed.zero_stage=3"])
    assert cfg.optim.lr == 1e-3 and cfg.debug.inject_nan_at_steps == [3, 4]
    assert cfg.model.kwargs["depth"] == 2 and cfg.model.kwargs["embed_dim"] == 64


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key optim.lrr"),
    ("nosuch.key=1", "unknown key nosuch"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("schedule.epochs=1.5", "schedule.epochs must be an integer"),
    ("model.grad_checkpointing=sometimes", "model.grad_checkpointing must be one of"),
    ("model.compile=max-autotune", "model.compile must be one of"),
    ("optim.betas=[0.9]", "optim.betas must hold 2 values"),
    ("optim.lr", "not of the form key=value"),
    ("data.normalize=bgr", "data.normalize must be one of"),
    ("data.crop_scale=[0.5, 0.2]", "data.crop_scale must be [low, high]"),
    ("optim.layer_decay_depth=-1", "optim.layer_decay_depth must be >= 0"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("tiny_pretrain_cpu", [override])


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key optim.learning_rate"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="no recipe named 'nope'"):
        load_config("nope")


def test_resolved_config_round_trips_through_the_run_directory(tmp_path):
    cfg = load_config("tiny_finetune_cpu", ["optim.lr=3e-3"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg


def test_deepspeed_json_disagreeing_with_the_run_fails(tmp_path):
    stated = json.loads((RECIPES_DIR.parents[1] / "ds_configs" / "zero2.json").read_text())
    stated["train_micro_batch_size_per_gpu"] = 16
    stated["gradient_clipping"] = 1.0
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(stated))
    cfg = load_config("tiny_pretrain_cpu", [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu is 16 .* gives 8 \(data.micro_batch\)"):
        build_ds_config(cfg, world_size=2)
    agreeing = load_config("tiny_pretrain_cpu", [f"deepspeed.config={path}", "data.micro_batch=16",
                                                 "optim.clip_grad=1.0"])
    assert build_ds_config(agreeing, world_size=2)["train_batch_size"] == 32
    with pytest.raises(ConfigError, match="zero_optimization.stage is 2 but the run asks for deepspeed.zero_stage=3"):
        build_ds_config(load_config("tiny_pretrain_cpu", [f"deepspeed.config={path}", "data.micro_batch=16",
                                                          "optim.clip_grad=1.0", "deepspeed.zero_stage=3"]), 2)
    with pytest.raises(ConfigError, match="does not exist"):
        build_ds_config(load_config("tiny_pretrain_cpu", ["deepspeed.config=zero9"]), 2)


class _Layered(nn.Module):
    """A small network with the layer-id interface of the iTPN models."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(2))
        self.head = nn.Linear(8, 3)
        self.num_lr_layers = 4

    def no_weight_decay(self):
        return {"pos_embed"}

    def lr_layer_id(self, name):
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return 0 if name == "pos_embed" else 3


def test_param_groups_exclude_norms_biases_and_pos_embed_from_decay_and_decay_lr_by_layer():
    model = _Layered()
    groups = param_groups(model, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["pos_embed"])]["wd_scale"] == 0.0
    assert by_param[id(named["blocks.0.0.weight"])]["wd_scale"] == 0.0  # LayerNorm weight
    assert by_param[id(named["blocks.0.1.bias"])]["wd_scale"] == 0.0
    assert by_param[id(named["blocks.0.1.weight"])]["wd_scale"] == 1.0
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["blocks.1.1.weight"])]["lr_scale"] == 0.5
    assert by_param[id(named["blocks.0.1.weight"])]["lr_scale"] == 0.25
    assert by_param[id(named["pos_embed"])]["lr_scale"] == 0.125
    assert sum(len(g["params"]) for g in groups) == len(named)
    with pytest.raises(ConfigError, match="needs a model with lr_layer_id"):
        param_groups(nn.Linear(2, 2), layer_decay=0.5)


def test_optimizer_choice_follows_device_and_offload():
    cfg = load_config("tiny_pretrain_cpu").optim
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_optimizer(cfg, offload=False, device=cpu) == "adamw"
    assert choose_optimizer(cfg, offload=False, device=cuda) == "adamw_fused"  # torch's own: no nvcc needed
    assert choose_optimizer(cfg, offload=True, device=cuda) == "cpu_adam"
    deepspeeds = load_config("tiny_pretrain_cpu", ["optim.optimizer=fused_adam"]).optim
    assert choose_optimizer(deepspeeds, offload=False, device=cuda) == "fused_adam"  # only when asked
    with pytest.raises(ConfigError, match="needs CUDA"):
        choose_optimizer(deepspeeds, False, cpu)


def test_fused_adamw_is_torchs_fused_kernel_and_steps_as_adamw():
    """``adamw_fused`` is ``torch.optim.AdamW(fused=True)`` (its CPU kernel here): the same update as the
    for-each AdamW, to rounding."""
    cfg = load_config("tiny_pretrain_cpu").optim
    stepped = {}
    for kind in ("adamw", "adamw_fused"):
        torch.manual_seed(0)
        model = nn.Linear(8, 4)
        optimizer = build_optimizer(param_groups(model), cfg, kind)
        assert optimizer.defaults["fused"] is (kind == "adamw_fused")
        for _ in range(3):
            model(torch.randn(16, 8)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        stepped[kind] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(stepped["adamw_fused"], stepped["adamw"])


def test_cosine_schedule_warms_up_then_decays_to_min_lr_and_sets_group_scales():
    cfg = load_config("tiny_pretrain_cpu", ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4",
                                            "optim.weight_decay=0.1", "optim.weight_decay_end=0.3"]).optim
    schedule = CosineSchedule.from_config(cfg, steps_per_epoch=10, total_steps=24)
    assert [schedule.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.lr_at(4) == pytest.approx(1.0)
    assert schedule.lr_at(14) == pytest.approx(0.55)
    assert schedule.lr_at(24) == pytest.approx(0.1)
    assert schedule.weight_decay_at(0) == pytest.approx(0.1) and schedule.weight_decay_at(24) == pytest.approx(0.3)
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": 0.5, "wd_scale": 0.0}])
    schedule.apply(opt, 14)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.275) and opt.param_groups[0]["weight_decay"] == 0.0
    assert math.isclose(schedule.weight_decay_at(12), 0.2)


def test_yaml_1_1_booleans_stay_strings_so_policy_names_parse(tmp_path):
    cfg = load_config("tiny_pretrain_cpu", ["model.grad_checkpointing=off", "tracking.enabled=false"])
    assert cfg.model.grad_checkpointing == "off" and cfg.tracking.enabled is False
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {grad_checkpointing: off, kwargs: {flag: yes}}\n")
    cfg = load_config(recipe)
    assert cfg.model.grad_checkpointing == "off" and cfg.model.kwargs["flag"] == "yes"


def test_a_precision_the_accelerator_lacks_is_refused_with_the_reason():
    from deepspeed.accelerator import get_accelerator

    from itpn_ds.engine.runtime import check_precision_supported

    if get_accelerator().is_fp16_supported():
        pytest.skip(f"the {get_accelerator().device_name()} accelerator supports fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        check_precision_supported("fp16")
    check_precision_supported("fp32")


def test_auto_bucket_sizes_follow_the_model_up_to_deepspeeds_default():
    cfg = load_config("tiny_pretrain_cpu", ["deepspeed.config=zero2"])
    small = build_ds_config(cfg, world_size=2, num_params=4_000_000)["zero_optimization"]
    assert small["reduce_bucket_size"] == small["allgather_bucket_size"] == 4_000_000
    large = build_ds_config(cfg, world_size=2, num_params=2_000_000_000)["zero_optimization"]
    assert large["reduce_bucket_size"] == 500_000_000


@pytest.mark.parametrize("config", ["zero1", "zero2", "zero3"])
def test_auto_bucket_sizes_of_an_odd_parameter_count_are_rounded_to_deepspeeds_alignment(config):
    cfg = load_config("tiny_pretrain_cpu", [f"deepspeed.config={config}"])
    zero = build_ds_config(cfg, world_size=2, num_params=318_339_809)["zero_optimization"]
    buckets = [zero[key] for key in ("reduce_bucket_size", "allgather_bucket_size") if key in zero]
    assert buckets and all(size == 318_339_810 for size in buckets), zero
    assert auto_bucket_size(565) == 566 and auto_bucket_size(566) == 566 and auto_bucket_size(10**9) == 500_000_000
