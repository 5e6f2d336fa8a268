"""GPU acceptance check: iTPN-L CLIP-L pre-training steps across ZeRO stage x teacher x compile x attention.

Each variant is a short real run of ``itpn-ds pretrain`` (recipe ``itpn_large_clip_l_pretrain``: model
``clip_tpn_large_2240_patch16_224``, teacher ViT-L-14, bf16, the engine's optimizer: on CUDA torch's fused AdamW,
which needs no ``nvcc``) in its own process, named
``zero{2,3}-{cache,online}-{eager,compiled}-{sdpa,flex}`` (``-full``: DALI's full-image decoding,
``data.decode=full``). Its first ``warmup`` steps are not timed; the last of them is profiled
(``torch.profiler``, CPU ops of the student's forward) to name the attention kernel that ran. The data is
made first, with the project's own tools: generated JPEGs -> ``write_shards`` (make-shards) ->
``extract_cache`` (extract-teacher, one view per image) with the teacher: a checkpoint given by
``--teacher-checkpoint`` or open_clip's ViT-L-14 with random weights (targets without meaning; speed is
the same).

Written (``--out``) and printed: one JSON with the environment, what was substituted, and per variant
images/s, MFU (``itpn_ds.engine.telemetry.model_flops_utilization`` of the model's ``forward_flops``),
peak GPU memory, the data-wait fraction, the attention kernel, the losses; a failed variant keeps the
last lines of its stderr and the others still run. Exit 1 when a variant failed, else 0.

Degraded machines: without DeepSpeed each variant runs the same model, loader, task, schedule and telemetry
as pure-torch steps (forward + backward + torch AdamW under bf16 autocast; no ZeRO, so the zero3 variants
are skipped); without DALI the torch loader (``data.loader=torch``, and extraction with its PIL decoder);
without CUDA every variant is skipped with the reason (the check is of a GPU; FlexAttention's backward needs
one) except under ``--smoke``. Each record names the optimizer the engine reported (``optimizer_used``) and the
environment whether ``nvcc`` is on the PATH and the NVIDIA driver's version, so a run on a node without a
CUDA compiler shows that the default optimizer needs none.

``--smoke`` runs the same code at tiny sizes on the CPU (the model's kwargs shrunk, a tiny open_clip
teacher, 3 steps, the optimizer DeepSpeed picks there) over a subset of the matrix; ``tests/test_gpu_check.py``
runs it, so the script cannot rot.

    bash benchmarks/gpu_check.sh                   # on the GPU machine (docs/benchmarks.md)
    python benchmarks/gpu_check.py [--variants default|all|NAME ...] [--budget-s 480] [--out FILE]
    python benchmarks/gpu_check.py --smoke [--engine torch] [--loader torch]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.fixtures.cli import step_metrics, zero3_config_partitioning_all  # noqa: E402

RECIPE = "itpn_large_clip_l_pretrain"
TEACHER_ARCH = "ViT-L-14"
TEACHER_PATCH = 14
# The tiny sizes of --smoke: the recipe's model at 64 px (4 x 4 tokens, as the tiny teacher's 56 px / 14).
SMOKE_MODEL = {"img_size": 64, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_depth1": 1, "mlp_depth2": 1,
               "fpn_dim": 32, "fpn_depth": 1, "teacher_dim": 32}
SMOKE_TEACHER = {"resolution": 56, "patch": TEACHER_PATCH, "width": 64, "layers": 2, "embed_dim": 32}
# Attention ops as the profiler names them -> the kernel they are.
SDPA_KERNELS = {"aten::_scaled_dot_product_flash_attention": "flash",
                "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
                "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
                "aten::_scaled_dot_product_cudnn_attention": "cudnn",
                "aten::_scaled_dot_product_attention_math": "math",
                "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable"}
ATTENTION_OP = re.compile(r"scaled_dot_product|flex_attention")
OPTIMIZER_LINE = re.compile(r"itpn_ds\.engine: engine: .* optimizer (\w+) \(")
STDERR_LINES = 60  # of a failed variant, kept in the JSON
MIN_VARIANT_S = 45  # a variant is not started with less of the budget left
log = logging.getLogger("itpn_ds.engine")


@dataclass(frozen=True)
class Variant:
    """One run of the matrix: ZeRO stage, where the targets come from, compilation, attention, JPEG decoding."""

    zero: int
    teacher: str
    compiled: bool
    attention: str
    decode: str = "roi"

    @property
    def name(self) -> str:
        suffix = "-full" if self.decode == "full" else ""
        return f"zero{self.zero}-{self.teacher}-{'compiled' if self.compiled else 'eager'}-{self.attention}{suffix}"

    @classmethod
    def parse(cls, name: str) -> "Variant":
        match = re.fullmatch(r"zero([23])-(cache|online)-(eager|compiled)-(sdpa|flex)(-full)?", name)
        if match is None:
            raise ValueError(f"--variants {name!r}: expected zero{{2,3}}-{{cache,online}}-"
                                             "{eager,compiled}-{sdpa,flex}[-full], 'default' or 'all'")
        zero, teacher, mode, attention, full = match.groups()
        return cls(int(zero), teacher, mode == "compiled", attention, "full" if full else "roi")


ALL_VARIANTS = [Variant(z, t, c, a) for z, t, c, a in
                itertools.product((2, 3), ("cache", "online"), (False, True), ("sdpa", "flex"))]
# What fits 8 minutes on one H100/H200: the baseline, every factor changed alone, and two combinations.
DEFAULT_VARIANTS = [Variant.parse(n) for n in (
    "zero2-cache-eager-sdpa", "zero2-cache-eager-flex", "zero2-cache-compiled-sdpa", "zero2-cache-compiled-flex",
    "zero2-online-eager-sdpa", "zero3-cache-eager-sdpa", "zero3-cache-compiled-flex", "zero2-cache-eager-sdpa-full")]
# --smoke on 2 CPU cores (about a minute): ZeRO-2 from the cache (the baseline), ZeRO-3 (every parameter
# partitioned) with the online teacher, and the flex variant, which the CPU must refuse with its reason.
# Compilation is left out: Inductor takes minutes on 2 cores (tests/test_engine_compile.py covers it).
SMOKE_VARIANTS = [Variant.parse(n) for n in ("zero2-cache-eager-sdpa", "zero3-online-eager-sdpa",
                                             "zero2-cache-eager-flex")]


@dataclass(frozen=True)
class Scale:
    """What ``--smoke`` shrinks. model_kwargs: overrides of the recipe's ``model.kwargs`` (empty: iTPN-L);
    teacher: sizes of a random tiny open_clip teacher (empty: ViT-L-14); steps include ``warmup``."""

    model_kwargs: dict[str, Any]
    teacher: dict[str, int]
    teacher_resolution: int
    micro_batch: int
    warmup: int
    steps: int
    image_sides: tuple[int, int]


FULL = Scale({}, {}, 196, 32, 3, 8, (256, 480))
SMOKE = Scale(SMOKE_MODEL, SMOKE_TEACHER, SMOKE_TEACHER["resolution"], 4, 1, 3, (80, 144))


@dataclass
class Plan:
    """How this machine runs the variants. engine: ``deepspeed`` (``itpn-ds pretrain``) or ``torch`` (pure-torch
    steps); loader: ``data.loader``; optimizer: ``optim.optimizer``; notes: every substitution, said once."""

    engine: str
    loader: str
    optimizer: str
    cuda: bool
    smoke: bool
    notes: list[str] = field(default_factory=list)
    blocker: str | None = None  # why nothing can run here


@dataclass(frozen=True)
class CheckData:
    """What the variants read: shards, the teacher cache over them, and the teacher (checkpoint, arch)."""

    shards: Path
    cache: Path
    teacher_checkpoint: Path
    teacher_arch: str


# ----------------------------------------------------------------------------------------- environment
def package_version(name: str, module: str) -> str | None:
    """The installed version of ``name`` when ``module`` can be found, else None."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except ModuleNotFoundError:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            "deepspeed": package_version("deepspeed", "deepspeed"),
            "open_clip": package_version("open_clip_torch", "open_clip"),
            "dali": package_version("nvidia-dali-cuda130", "nvidia.dali"),
            "timm": package_version("timm", "timm"), "nvcc": shutil.which("nvcc"), "driver": nvidia_driver()}


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``), None without one."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = proc.stdout.split("\n")[0].strip() if proc.returncode == 0 else ""
    return version or None


def make_plan(env: dict[str, Any], engine: str, loader: str, smoke: bool) -> Plan:
    cuda = env["cuda"] is not None
    notes = []
    if engine == "auto":
        engine = "deepspeed" if env["deepspeed"] else "torch"
        if engine == "torch":
            notes.append("DeepSpeed is not installed: each variant runs pure-torch model steps (the same model, loader, "
                         "task, schedule and telemetry; forward + backward + torch AdamW under bf16 autocast, no ZeRO) "
                         "instead of itpn-ds pretrain")
    if loader == "auto":
        loader = "dali" if env["dali"] else "torch"
        if loader == "torch":
            notes.append("DALI is not installed: data.loader=torch (PIL decoding) for training and teacher extraction")
    optimizer = "adamw" if engine == "torch" else "auto"  # auto: the engine's choice (CUDA: torch's fused AdamW)
    if smoke:
        notes.append("--smoke: tiny model and teacher on the CPU, the engine's CPU optimizer choice (torch AdamW)")
    blocker = None if env["open_clip"] else ("open_clip is not installed: the teacher (cache extraction and the online "
                                             "variants) needs it; carry its wheel (docs/benchmarks.md)")
    return Plan(engine, loader, optimizer, cuda, smoke, notes, blocker)


def skip_reason(variant: Variant, plan: Plan) -> str | None:
    """Why ``variant`` cannot run here, or None."""
    if plan.blocker:
        return plan.blocker
    if not plan.cuda and not plan.smoke:
        return "no CUDA device: the check trains bf16 on a GPU (run --smoke on the CPU)"
    if variant.attention == "flex" and not plan.cuda:
        return ("FlexAttention has no backward on the CPU: the project refuses model.attention=flex for CPU "
                "training")
    if plan.engine == "torch" and variant.zero != 2:
        return "no DeepSpeed, so no ZeRO stage: the pure-torch steps of the zero2 variant stand for this one"
    if variant.decode == "full" and plan.loader != "dali":
        return "data.decode=full is a DALI option; the torch loader always decodes whole images"
    return None


# ---------------------------------------------------------------------------------------------- data
def synthetic_photo(seed: int, side: int = 640) -> np.ndarray:
    """A (side, side, 3) uint8 picture: a smooth random colour field with fine noise (JPEGs of varied content
    without any download or scikit-image)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)[0]
    pixels = smooth.permute(1, 2, 0).numpy() * 200 + rng.normal(0, 12, (side, side, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_images(root: Path, count: int, sides: tuple[int, int], classes: int = 4) -> Path:
    """``count`` JPEGs in ``classes`` ImageFolder classes (random crops of one synthetic photo per class,
    both sides in ``sides`` px, by ``data_tools.demo_images.write_variants``)."""
    from data_tools.demo_images import write_variants

    for c in range(classes):
        per_class = count // classes + (c < count % classes)
        write_variants(synthetic_photo(c), np.random.default_rng(c), root / f"class{c}", f"class{c}", per_class,
                       sides[0], sides[1], quality=90)
    return root


def write_teacher(work: Path, scale: Scale) -> tuple[Path, str]:
    """(checkpoint, arch) of a teacher with random weights: open_clip's ViT-L-14, or the tiny one of ``--smoke``."""
    from itpn_ds.teacher.random_clip import random_clip_state_dict, write_random_open_clip_checkpoint

    if scale.teacher:
        path, config = write_random_open_clip_checkpoint(work / "teacher.pt", work / "tiny-clip.json", **scale.teacher)
        return path, str(config)
    import open_clip

    path = work / "vit_l_14_random.pt"
    if not path.is_file():  # float32 (fp16-exact values): open_clip cannot resize a half position table to 196 px
        torch.save(random_clip_state_dict(open_clip.get_model_config(TEACHER_ARCH)), path)
    return path, TEACHER_ARCH


def prepare(work: Path, scale: Scale, plan: Plan, teacher: Path | None) -> CheckData:
    """Images -> shards -> a one-view teacher cache, under ``work`` (re-made every run: a few seconds)."""
    from itpn_ds.data.shards import write_shards
    from itpn_ds.data.sources import image_folder_items, shuffled
    from itpn_ds.teacher.extract import ExtractConfig, extract_cache

    for stale in ("images", "shards", "cache"):
        shutil.rmtree(work / stale, ignore_errors=True)
    folder = make_images(work / "images", scale.micro_batch * scale.steps, scale.image_sides)
    items, classes = image_folder_items(folder)
    write_shards(shuffled(items, 0), work / "shards", classes, str(folder), target_shard_bytes=4 << 20, progress=False)
    checkpoint, arch = (teacher, TEACHER_ARCH) if teacher else write_teacher(work, scale)
    extract_cache(ExtractConfig(shards=work / "shards", out=work / "cache", checkpoint=checkpoint, arch=arch,
                                resolution=scale.teacher_resolution, num_views=1, batch_size=64,
                                num_threads=decode_threads(), progress=False, loader=plan.loader))
    return CheckData(work / "shards", work / "cache", checkpoint, arch)


def decode_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------ variants
def overrides(variant: Variant, data: CheckData, scale: Scale, plan: Plan, work: Path) -> list[str]:
    """The ``key=value`` overrides of the recipe for one variant."""
    if variant.zero == 3 and plan.smoke:  # the tiny model's tensors are all below ZeRO-3's persistence threshold
        zero_config = str(zero3_config_partitioning_all(work))
    else:
        zero_config = f"zero{variant.zero}"
    teacher = [f"teacher.cache={data.cache}"] if variant.teacher == "cache" else [f"teacher.checkpoint={data.teacher_checkpoint}"]
    return [f"data.shards={data.shards}", f"data.loader={plan.loader}", f"data.decode={variant.decode}",
            f"data.micro_batch={scale.micro_batch}", f"data.num_threads={decode_threads()}",
            f"teacher.mode={variant.teacher}", f"teacher.arch={data.teacher_arch}",
            f"teacher.resolution={scale.teacher_resolution}", *teacher,
            *(f"model.kwargs.{k}={v}" for k, v in scale.model_kwargs.items()),
            f"model.compile={'on' if variant.compiled else 'off'}", f"model.attention={variant.attention}",
            f"deepspeed.config={zero_config}", "deepspeed.precision=bf16", f"optim.optimizer={plan.optimizer}",
            "optim.warmup_steps=1", f"schedule.max_steps={scale.steps}", "schedule.epochs=2",
            "schedule.global_batch=0",  # a step is one micro-batch per rank: a check, not the recipe's 2048
            "checkpoint.every_steps=0", "checkpoint.keep_last=1", "tracking.enabled=false", "telemetry.log_every=1"]


def run_variant(variant: Variant, data: CheckData, scale: Scale, plan: Plan, work: Path, timeout: float,
                keep: bool) -> dict[str, Any]:
    """Run one variant in a fresh process; its record for the JSON (status ``passed`` or ``failed``)."""
    run_dir = work / "runs" / variant.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    kernels = run_dir / "attention_ops.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", plan.engine, str(scale.warmup), str(kernels), "--",
           "--config", RECIPE, "--run-dir", str(run_dir), *overrides(variant, data, scale, plan, work)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if not plan.cuda:
        env["DS_ACCELERATOR"] = "cpu"
    start = time.perf_counter()
    code, out, err = run_process(cmd, env, timeout)
    record: dict[str, Any] = {"name": variant.name, **asdict(variant), "engine": plan.engine,
                              "optimizer": plan.optimizer, "wall_s": round(time.perf_counter() - start, 1)}
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{variant.name}.out").write_text(out)
    (work / "logs" / f"{variant.name}.err").write_text(err)
    ops = json.loads(kernels.read_text()) if kernels.is_file() else {}
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)  # iTPN-L's final checkpoint is 4.3 GB
    try:
        if code != 0:
            raise RuntimeError("timed out after %.0f s" % timeout if code is None else f"exit code {code}")
        record.update(summarize(step_metrics(out), scale.warmup, scale.steps))
    except (RuntimeError, KeyError, ValueError) as exc:
        tail = (err.strip() or out.strip()).splitlines()[-STDERR_LINES:]
        return {**record, "status": "failed", "returncode": code, "error": f"{exc}\n" + "\n".join(tail),
                "log": str(work / "logs" / variant.name)}
    record.update(status="passed", attention_kernel=attention_kernel(variant.attention, ops), attention_ops=ops,
                  optimizer_used=optimizer_used(out))
    return record


def optimizer_used(stdout: str) -> str | None:
    """The optimizer kind the engine's start-up line names (``optimizer adamw_fused (AdamW)``); None for the
    pure-torch steps, which print no such line."""
    found = OPTIMIZER_LINE.search(stdout)
    return found.group(1) if found else None


def run_process(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr); a timed-out process group is killed (compile workers too)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def summarize(steps: dict[int, dict[str, float]], warmup: int, expected: int) -> dict[str, Any]:
    """Figures of the steps after ``warmup``: images/s and data-wait fraction over their summed time, the
    median step, the peak memory, the first and last loss."""
    if sorted(steps) != list(range(1, expected + 1)):
        raise ValueError(f"expected step lines 1..{expected}, got {sorted(steps)}")
    timed = [steps[s] for s in range(warmup + 1, expected + 1)]
    seconds = sum(m["step_s"] for m in timed)
    return {"images_per_s": sum(m["images_per_s"] * m["step_s"] for m in timed) / seconds,
            "step_s_median": statistics.median(m["step_s"] for m in timed),
            "data_wait_frac": sum(m["data_wait_frac"] * m["step_s"] for m in timed) / seconds,
            "targets_s_mean": statistics.fmean(m["targets_s"] for m in timed),
            "peak_mem_gib": max(m["peak_mem_gib"] for m in steps.values()),
            "loss_first": steps[1]["loss"], "loss_last": steps[expected]["loss"], "timed_steps": len(timed)}


def attention_kernel(attention: str, ops: dict[str, int]) -> str:
    """``flex``, or the SDPA kernel(s) the profiled forward dispatched to."""
    if attention == "flex":
        return "flex"
    kernels = sorted({SDPA_KERNELS[name] for name in ops if name in SDPA_KERNELS})
    return ", ".join(kernels) or "no aten SDPA kernel seen"


def flops_per_image(scale: Scale) -> float:
    """Forward FLOPs of one image of the checked model (``forward_flops`` on the meta device: no memory, no time)."""
    from itpn_ds.config import load_config
    from itpn_ds.engine.model import build_model, forward_flops_per_image

    cfg = load_config(RECIPE, [f"model.kwargs.{k}={v}" for k, v in scale.model_kwargs.items()])
    with torch.device("meta"):
        model = build_model(cfg)
    return forward_flops_per_image(model)


def add_mfu(record: dict[str, Any], flops: float, peak_tflops: float) -> None:
    from itpn_ds.engine.telemetry import model_flops_utilization

    record["mfu"] = model_flops_utilization(flops, record["images_per_s"], peak_tflops) if peak_tflops > 0 else None


# ------------------------------------------------------------------------------------ in the child
class AttentionProbe:
    """Profiles the student's forward in training step ``step`` (1-based; forwards in eval mode, such as the
    FLOP count, are not steps) and keeps the attention ops it dispatched: {profiler op name: calls}."""

    def __init__(self, step: int) -> None:
        self.step, self.calls, self.ops = step, 0, {}
        self._profiler: torch.profiler.profile | None = None

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)
        return model

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        if module.training:
            self.calls += 1
            if self.calls == self.step:
                self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self._profiler.__enter__()

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._profiler is not None and self.calls == self.step:
            self._profiler.__exit__(None, None, None)
            self.ops = {e.key: e.count for e in self._profiler.key_averages() if ATTENTION_OP.search(e.key)}
            self._profiler = None


def child(engine: str, profile_step: int, ops_out: Path, argv: list[str]) -> int:
    """One variant: ``itpn-ds pretrain ARGV`` (or its pure-torch steps), the model's forward in ``profile_step``
    profiled; the attention ops go to ``ops_out``."""
    from itpn_ds import cli
    from itpn_ds.engine import commands, model

    probe = AttentionProbe(profile_step)
    build_model = model.build_model
    # itpn-ds pretrain (commands) and the pure-torch steps (train_without_deepspeed) build through these names
    model.build_model = commands.build_model = lambda cfg: probe.attach(build_model(cfg))
    try:
        return cli.main(["pretrain", *argv]) if engine == "deepspeed" else torch_pretrain(argv)
    finally:
        ops_out.write_text(json.dumps(probe.ops))


def torch_pretrain(argv: list[str]) -> int:
    """``itpn-ds pretrain``'s arguments and error handling around :func:`train_without_deepspeed`."""
    from itpn_ds.config import ConfigError, load_config
    from itpn_ds.engine.commands import add_arguments
    from itpn_ds.teacher.cache import CacheError
    from itpn_ds.teacher.clip import TeacherLoadError

    parser = argparse.ArgumentParser(prog="gpu_check child torch")
    add_arguments(parser, "pretrain")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        train_without_deepspeed(load_config(args.config, ["task=pretrain", *args.overrides]))
    except (ConfigError, CacheError, TeacherLoadError) as exc:
        print(f"gpu_check (pure-torch steps): {exc}", file=sys.stderr)
        return 2
    return 0


def train_without_deepspeed(cfg: Any) -> None:
    """``schedule.max_steps`` steps of the run's model, loader, task and schedule without DeepSpeed: fp32 weights,
    bf16 autocast, torch AdamW over the project's parameter groups, gradient clipping as configured; each step
    logged as the trainer logs it (``itpn_ds.engine.telemetry``). No checkpoints."""
    from itpn_ds.engine import model as run_model
    from itpn_ds.engine.optim import build_optimizer, param_groups
    from itpn_ds.engine.runtime import seed_everything
    from itpn_ds.engine.schedule import CosineSchedule
    from itpn_ds.engine.tasks import task_family
    from itpn_ds.engine.telemetry import StepTimer, device_peak_tflops, format_metrics, step_metrics as metrics_of

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    seed_everything(cfg.schedule.seed)
    model = run_model.build_model(cfg).to(device)
    family = task_family(cfg)
    flops = family.flops_per_image(model)
    loader, _ = family.loaders(rank=0, world_size=1, train=True)
    task = family.loss(device)
    optimizer = build_optimizer(param_groups(model), cfg.optim, "adamw")
    schedule = CosineSchedule.from_config(cfg.optim, len(loader), cfg.schedule.max_steps)
    peak = device_peak_tflops(cfg.telemetry.peak_tflops)
    batches = endless(loader)
    model.train()
    for step in range(cfg.schedule.max_steps):
        timer = StepTimer()
        lr = schedule.apply(optimizer, step)
        start = time.perf_counter()
        batch = next(batches).to(device)
        timer.waited(time.perf_counter() - start)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            result = task.forward(model, batch)
        result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses = {"loss": float(result.loss), **{k: float(v) for k, v in result.parts.items()}}
        metrics = metrics_of(losses, lr, float(grad_norm), float(result.valid), timer, flops, peak, 1, 0)
        log.info(format_metrics(step + 1, 0, metrics))


def endless(loader: Any) -> Iterator[Any]:
    """The loader's batches over epoch after epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


# ------------------------------------------------------------------------------------------ the check
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    parser.add_argument("--variants", nargs="+", default=["default"],
                        help="variant names, 'default' (8 that fit 8 minutes; --smoke: its subset) or 'all' (16)")
    parser.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto",
                        help="auto: DeepSpeed when installed, else the pure-torch steps")
    parser.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                        help="auto: DALI when installed, else the torch loader")
    parser.add_argument("--teacher-checkpoint", type=Path, default=None,
                        help="a ViT-L-14 checkpoint (OpenAI's ViT-L-14.pt); default: random weights")
    parser.add_argument("--micro-batch", type=int, default=None, help="per-GPU batch (default: the recipe's 32)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant, warm-up included (default 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3, >= 1)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting variants when this much wall time is spent (default 480; --smoke: none)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="device peak for MFU (default: the known GPU's dense bf16 peak; none on the CPU)")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a new temporary one)")
    parser.add_argument("--keep-runs", action="store_true", help="keep each variant's run directory")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    args.scale = replace(base, **{k: v for k, v in (("micro_batch", args.micro_batch), ("steps", args.steps),
                                                      ("warmup", args.warmup)) if v is not None})
    if not 1 <= args.scale.warmup < args.scale.steps:
        parser.error(f"need 1 <= --warmup < --steps, got {args.scale.warmup} and {args.scale.steps}")
    names = args.variants
    try:
        args.matrix = (SMOKE_VARIANTS if args.smoke else DEFAULT_VARIANTS) if names == ["default"] else \
            ALL_VARIANTS if names == ["all"] else [Variant.parse(n) for n in names]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def check(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else (0 if args.smoke else 480)
    env = environment()
    plan = make_plan(env, args.engine, args.loader, args.smoke)
    scale = args.scale
    peak = args.peak_tflops
    if peak <= 0:
        from itpn_ds.engine.telemetry import device_peak_tflops

        peak = device_peak_tflops(0.0)
    result: dict[str, Any] = {"check": "gpu_check", "smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "environment": env, "engine": plan.engine, "loader": plan.loader,
                              "optimizer": plan.optimizer, "notes": plan.notes, "recipe": RECIPE,
                              "model_kwargs_overrides": scale.model_kwargs, "micro_batch": scale.micro_batch,
                              "warmup_steps": scale.warmup, "timed_steps": scale.steps - scale.warmup,
                              "peak_tflops": peak or None, "flops_per_image": flops_per_image(scale),
                              "teacher": {"arch": TEACHER_ARCH if not scale.teacher else "tiny open_clip (--smoke)",
                                          "weights": str(args.teacher_checkpoint or "random"),
                                          "resolution": scale.teacher_resolution}}
    records = {v.name: {"name": v.name, **asdict(v), "status": "skipped", "reason": reason}
               for v in args.matrix if (reason := skip_reason(v, plan)) is not None}
    runnable = [v for v in args.matrix if v.name not in records]
    work = args.work or Path(tempfile.mkdtemp(prefix="itpn_ds_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    if runnable:
        prepared = time.perf_counter()
        data = prepare(work, scale, plan, args.teacher_checkpoint)
        result["prepare_s"] = round(time.perf_counter() - prepared, 1)
    for i, variant in enumerate(runnable):
        left = budget - (time.perf_counter() - start) if budget else 3600.0
        if left < MIN_VARIANT_S:
            records[variant.name] = {"name": variant.name, **asdict(variant), "status": "skipped",
                                     "reason": f"time budget: {max(left, 0):.0f} s of --budget-s {budget:.0f} left"}
            continue
        print(f"[{i + 1}/{len(runnable)}] {variant.name} ...", file=sys.stderr, flush=True)
        record = run_variant(variant, data, scale, plan, work, left, args.keep_runs)
        if record["status"] == "passed":
            add_mfu(record, result["flops_per_image"], peak)
        records[variant.name] = record
        print(f"    {record['status']} ({record['wall_s']} s)" + (
            f": {record['images_per_s']:.1f} images/s, {record['attention_kernel']}" if record["status"] == "passed"
            else ": " + record["error"].splitlines()[0]), file=sys.stderr, flush=True)
    result["variants"] = [records[v.name] for v in args.matrix]
    for status in ("passed", "failed", "skipped"):
        result[status] = sum(r["status"] == status for r in result["variants"])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["work"] = str(work)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"{'variant':<30} {'status':<8} {'images/s':>9} {'MFU':>6} {'peak GiB':>9} {'data wait':>9}  attention")
    for r in result["variants"]:
        if r["status"] != "passed":
            reason = r.get("reason") or r["error"].splitlines()[0]
            print(f"{r['name']:<30} {r['status']:<8} {reason}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['name']:<30} {r['status']:<8} {r['images_per_s']:>9.1f} {mfu:>6} {r['peak_mem_gib']:>9.2f} "
              f"{r['data_wait_frac']:>9.1%}  {r['attention_kernel']}")
    for note in result["notes"]:
        print(f"note: {note}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["child"]:
        engine, step, ops_out, dashes, *rest = argv[1:]
        assert dashes == "--", argv
        return child(engine, int(step), Path(ops_out), rest)
    args = parse_args(argv)
    result = check(args)
    print_table(result)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    if result["passed"] == 0 and result["failed"] == 0:
        print("gpu_check: no variant could run here (see each variant's reason)", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
