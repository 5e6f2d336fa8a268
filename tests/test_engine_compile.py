"""``model.compile=on`` (regional compilation of the repeated blocks, ``itpn_ds.models.compile``).

Through the real engine (CLI, 2 CPU ranks, DALI, teacher cache, tiny iTPN, fp32): a compiled run under ZeRO-3 (all
parameters partitioned: each compiled block is gathered whole by its hooks, which run outside its graph) with
activation checkpointing of every block is SIGKILLed mid-run and resumed. Its losses agree with the eager ZeRO-2
run's (the demo recipes' stage; one rank in the test process, accumulating the same global batch), the resumed
run replays the steps after its checkpoint to the killed run's losses, and it compiles one graph per block type
with no graph break. In process (``build_model``): both objectives under activation checkpointing match eager
losses and gradients, parameter names are unchanged, and a model without our block lists is refused. ZeRO-0/1/2
change nothing in the module tree (no hooks on the modules; ZeRO-2's gradient hooks sit on the parameters, outside
any compiled graph), so ``build_model``'s model is what they run.

Inductor keeps its kernels in the venv (``TORCHINDUCTOR_CACHE_DIR``): the first run of the suite compiles them
(about 55 s of CPU for the two in-process models, 5 s from the cache). The 2-rank runs do not find the in-process
models' graphs in the cache even at the same shapes (1 to 5 hits of 14, 2026-12-07), so the killed run compiles
its own and the resumed run reads them; but the in-process CLIP test runs at the ranks' shapes, where about half
of the ranks' C++ kernels are the same source and so come from the cache, not from the compiler (on a fresh
cache, 2 compiled steps on 2 ranks: 71 CPU-s after that test against 98 alone).
"""
import re
from pathlib import Path

import pytest
import torch

from itpn_ds.config import ConfigError, load_config
from itpn_ds.engine.model import build_model
from itpn_ds.models.compile import repeated_blocks
from itpn_ds.models.pixel_mae import random_masking
from tests.fixtures.cli import losses_by_step, run_cli, run_in_process, succeeded, zero3_config_partitioning_all
from tests.test_engine_zero import GLOBAL_BATCH, MICRO_BATCH, TEACHER_DIM, pretrain_args

pytestmark = pytest.mark.compile
STEPS = 4
CHECKPOINT_EVERY = 2
KILL_BEFORE = 4  # rank 1 SIGKILLs itself before this step: the run holds the checkpoint of step 2
FP32_REL = 1e-4  # compiled kernels sum in other orders than eager ones; 2 ZeRO-3 ranks reduce the gradients otherwise


def forward_is_compiled(block: torch.nn.Module) -> bool:
    """The block's ``forward`` is an instance attribute made by ``torch.compile``."""
    return hasattr(vars(block).get("forward"), "_torchdynamo_orig_callable")


def built(recipe: str, *overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(recipe, ["model.drop_path_rate=0", *overrides]))


def assert_same_loss_and_grads(eager: torch.nn.Module, compiled: torch.nn.Module, loss_of) -> None:
    want, got = loss_of(eager), loss_of(compiled)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_build_model_compiles_every_repeated_block_and_keeps_the_parameter_names():
    eager, compiled = built("tiny_pretrain_cpu"), built("tiny_pretrain_cpu", "model.compile=on")
    blocks = list(repeated_blocks(compiled))
    # 1 + 1 MLP blocks, 4 main blocks, 3 + 1 + 1 pyramid blocks, 2 auxiliary blocks
    assert len(blocks) == 13 and all(forward_is_compiled(b) for b in blocks)
    assert not any(forward_is_compiled(b) for b in repeated_blocks(eager))
    assert all(b._compiled_call_impl is None for b in blocks)  # the blocks' hooks run eagerly, outside the graph
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert torch._dynamo.config.recompile_limit >= 2 * len(blocks)


def test_compiled_clip_distillation_with_its_mask_and_checkpointing_matches_eager():
    """At the 2-rank runs' micro-batch and teacher width: their ranks find about half of their kernels (28 of 51
    compiled anew, not 51) in Inductor's cache after this test, though none of its graphs."""
    ckpt = ("model.grad_checkpointing=every_k", "model.checkpoint_every_k=2", f"model.kwargs.teacher_dim={TEACHER_DIM}")
    eager, compiled = built("tiny_pretrain_cpu", *ckpt), built("tiny_pretrain_cpu", *ckpt, "model.compile=on")
    images = torch.randn(MICRO_BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(MICRO_BATCH, 16, dtype=torch.bool)
    mask[:, 1::3] = True
    target = torch.randn(MICRO_BATCH, 16, TEACHER_DIM, generator=torch.Generator().manual_seed(2))

    def loss_of(model):
        main, aux = model(images, mask)
        return (main - target).square().mean() + (aux - target).square().mean()

    assert_same_loss_and_grads(eager, compiled, loss_of)


def test_compiled_pixel_objective_with_checkpointing_matches_eager():
    ckpt = ("model.grad_checkpointing=every",)
    eager, compiled = built("tiny_pretrain_pixel_cpu", *ckpt), built("tiny_pretrain_pixel_cpu", *ckpt, "model.compile=on")
    size = eager.img_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids_keep, ids_restore, _ = random_masking(2, eager.grid ** 2, 0.75, generator=torch.Generator().manual_seed(3))
    assert_same_loss_and_grads(eager, compiled, lambda model: model(images, ids_keep=ids_keep, ids_restore=ids_restore)[0])


def test_compiling_a_model_without_our_block_lists_is_refused():
    with pytest.raises(ConfigError, match=r"model.compile=on with model.name='resnet18'.*no repeated blocks"):
        build_model(load_config("tiny_finetune_cpu", ["model.name=resnet18", "model.kwargs={}", "model.compile=on"]))


def run_args(run_dir: Path, shards: Path, cache: Path, *overrides: str) -> tuple[str, ...]:
    """``STEPS`` steps of the tiny CLIP pre-training in fp32 at a global batch of 8, checkpointing every
    ``CHECKPOINT_EVERY``."""
    return pretrain_args(run_dir, shards, cache, f"schedule.max_steps={STEPS}", GLOBAL_BATCH,
                         f"checkpoint.every_steps={CHECKPOINT_EVERY}", "checkpoint.keep_last=3", *overrides,
                         precision="fp32")


def run(run_dir: Path, shards: Path, cache: Path, *overrides: str):
    """``run_args`` on 2 ranks; not checked."""
    return run_cli(*run_args(run_dir, shards, cache, *overrides), ranks=2)


@pytest.fixture(scope="module")
def eager_losses(demo_shards, demo_cache, tmp_path_factory) -> dict[int, float]:
    """The eager reference under ZeRO-2, one rank in this process: the same batches as the 2 ranks' (its global
    batch of 8 is 2 accumulated micro-batches of 4), the gradients summed in another order."""
    out = succeeded(run_in_process(*run_args(tmp_path_factory.mktemp("eager"), demo_shards, demo_cache,
                                             "deepspeed.config=zero2")))
    return losses_by_step(out)


@pytest.fixture(scope="module")
def killed_and_resumed(demo_shards, demo_cache, tmp_path_factory) -> tuple[Path, dict[int, float], str]:
    """A compiled ZeRO-3 run checkpointing every block, SIGKILLed before step KILL_BEFORE, then resumed in the same
    directory: (run dir, the killed run's losses, the resumed run's stdout)."""
    run_dir = tmp_path_factory.mktemp("compiled")
    zero3_json = zero3_config_partitioning_all(tmp_path_factory.mktemp("zero3_json"))
    compiled = ("model.compile=on", f"deepspeed.config={zero3_json}", "model.grad_checkpointing=every")
    killed = run(run_dir, demo_shards, demo_cache, *compiled, f"debug.kill_at_step=[1, {KILL_BEFORE}]")
    assert killed.returncode != 0, killed.stdout[-3000:]
    resumed = succeeded(run(run_dir, demo_shards, demo_cache, *compiled))
    return run_dir, losses_by_step(killed.stdout), resumed


@pytest.mark.dist
def test_compiled_zero3_with_checkpointing_agrees_with_eager(eager_losses, killed_and_resumed):
    _, killed, resumed = killed_and_resumed
    assert sorted(killed) == list(range(1, KILL_BEFORE)), killed
    compiled = {**killed, **losses_by_step(resumed)}
    assert sorted(compiled) == list(range(1, STEPS + 1)), compiled
    for step in compiled:
        assert compiled[step] == pytest.approx(eager_losses[step], rel=FP32_REL), (step, compiled, eager_losses)
    assert compiled[STEPS] < compiled[1]


@pytest.mark.dist
def test_sigkilled_compiled_run_resumes_to_the_uninterrupted_losses(killed_and_resumed):
    run_dir, killed, resumed = killed_and_resumed
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert "resumed from" in resumed and f"step_{CHECKPOINT_EVERY:08d}" in resumed
    losses = losses_by_step(resumed)
    assert sorted(losses) == list(range(CHECKPOINT_EVERY + 1, STEPS + 1)), losses
    # steps after the checkpoint and before the kill ran in both processes: the same weights, data and RNG
    for step in range(CHECKPOINT_EVERY + 1, KILL_BEFORE):
        assert losses[step] == pytest.approx(killed[step], rel=1e-6), (step, losses, killed)


@pytest.mark.dist
def test_zero3_gathers_compiled_blocks_outside_their_graphs(killed_and_resumed):
    """Each compiled block is a ZeRO-3 leaf module and only its ``forward`` is compiled, so no DeepSpeed hook is
    traced: no graph break, and one graph per block type of the CLIP-distillation model (7; the checkpointed
    recompute reruns the same graph), not one per hooked layer."""
    _, _, resumed = killed_and_resumed
    report = re.search(r"compile: (\d+) graphs, (\d+) graph breaks", resumed)
    assert report, resumed[-3000:]
    assert tuple(map(int, report.groups())) == (7, 0), report.group(0)
