"""``benchmarks/gpu_check.py``, the GPU acceptance check, kept from rotting on the CPU.

``--smoke`` runs the check's own code at tiny sizes (1 CPU rank, DeepSpeed's CPU accelerator): the data made
by the project's tools, each variant a real ``itpn-ds pretrain`` process, the figures parsed from its step
lines, the attention kernel from the profiled forward. Its subset: ZeRO-2 from the teacher cache, ZeRO-3
(every parameter partitioned) with the online teacher, and FlexAttention, which the CPU must skip with the
reason. Compiled variants are left out (Inductor takes minutes on 2 cores; ``test_engine_compile.py`` covers
compilation through the engine). The fallbacks: the pure-torch steps with the torch loader (a cache extracted
with PIL), a failing variant recorded with its error, and the full check on a machine without CUDA.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SDPA_KERNELS = {"flash (CPU)", "math"}  # what the CPU's SDPA dispatches to with an additive float mask


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def run_check(tmp_path: Path, *args: str) -> dict:
    """``gpu_check.py --smoke ARGS`` as a process that must exit 0 with every run variant passed; its JSON."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--peak-tflops", "1", "--work", str(tmp_path / "work"),
                           "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    result = json.loads(out.read_text()) if out.is_file() else None
    failures = [f"{r['name']}:\n{r['error']}" for r in (result or {}).get("variants", []) if r["status"] == "failed"]
    assert not failures, "\n\n".join(failures)
    assert proc.returncode == 0 and result is not None, proc.stdout[-4000:] + proc.stderr[-4000:]
    return result


def by_name(result: dict) -> dict[str, dict]:
    return {r["name"]: r for r in result["variants"]}


def assert_sensible(record: dict, timed_steps: int) -> None:
    assert record["status"] == "passed", record
    assert record["timed_steps"] == timed_steps
    assert record["images_per_s"] > 0 and math.isfinite(record["images_per_s"])
    assert 0 < record["mfu"] < 1
    assert 0 < record["peak_mem_gib"] < 64
    assert 0 <= record["data_wait_frac"] < 1
    assert record["step_s_median"] > 0
    assert math.isfinite(record["loss_first"]) and math.isfinite(record["loss_last"]) and record["loss_first"] > 0


def attention_layers() -> int:
    """How many attention layers the smoke's tiny model has (main and auxiliary blocks)."""
    from itpn_ds.config import load_config
    from itpn_ds.engine.model import build_model
    from itpn_ds.models.layers import Attention

    model = build_model(load_config(gpu_check.RECIPE, [f"model.kwargs.{k}={v}" for k, v in gpu_check.SMOKE_MODEL.items()]))
    return sum(isinstance(m, Attention) for m in model.modules())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return run_check(tmp_path_factory.mktemp("smoke"))


@pytest.mark.dist  # each variant an itpn-ds process
def test_smoke_runs_its_variants_through_itpn_ds_pretrain(smoke):
    variants = by_name(smoke)
    assert list(variants) == [v.name for v in gpu_check.SMOKE_VARIANTS]
    assert smoke["engine"] == "deepspeed" and smoke["loader"] == "dali" and smoke["environment"]["cuda"] is None
    assert (smoke["passed"], smoke["failed"], smoke["skipped"]) == (2, 0, 1)
    assert smoke["flops_per_image"] > 0 and smoke["peak_tflops"] == 1.0
    for name in ("zero2-cache-eager-sdpa", "zero3-online-eager-sdpa"):
        record = variants[name]
        assert_sensible(record, timed_steps=2)
        assert record["engine"] == "deepspeed" and record["optimizer_used"] == "adamw"  # the engine's CPU choice
        assert record["attention_kernel"] in SDPA_KERNELS, record["attention_ops"]
        # one call per attention layer of the student's forward; the online teacher's calls are not in it
        assert record["attention_ops"]["aten::scaled_dot_product_attention"] == attention_layers(), record
    # the online teacher's forward is timed as target time; cached targets are read in microseconds
    assert variants["zero3-online-eager-sdpa"]["targets_s_mean"] > 10 * variants["zero2-cache-eager-sdpa"]["targets_s_mean"]


@pytest.mark.dist  # each variant an itpn-ds process
def test_flex_is_skipped_on_the_cpu_with_the_reason(smoke):
    record = by_name(smoke)["zero2-cache-eager-flex"]
    assert record["status"] == "skipped" and "no backward on the CPU" in record["reason"]


@pytest.mark.dist  # each variant an itpn-ds process
def test_pure_torch_steps_with_the_torch_loader_stand_in_for_deepspeed_and_dali(tmp_path):
    result = run_check(tmp_path, "--engine", "torch", "--loader", "torch", "--variants", "zero2-cache-eager-sdpa",
                       "zero3-cache-eager-sdpa", "zero2-cache-eager-sdpa-full")
    variants = by_name(result)
    assert result["engine"] == "torch" and result["loader"] == "torch"
    record = variants["zero2-cache-eager-sdpa"]
    assert_sensible(record, timed_steps=2)
    assert record["engine"] == "torch" and record["attention_kernel"] in SDPA_KERNELS
    assert record["loss_last"] < record["loss_first"]
    assert variants["zero3-cache-eager-sdpa"]["status"] == "skipped"
    assert "no ZeRO stage" in variants["zero3-cache-eager-sdpa"]["reason"]
    assert "DALI option" in variants["zero2-cache-eager-sdpa-full"]["reason"]


@pytest.mark.dist  # each variant an itpn-ds process
def test_a_failing_variant_is_recorded_with_its_error(tmp_path):
    """The child's own one-line error (here: a teacher cache directory without cache files) ends up in the record."""
    (tmp_path / "cache").mkdir()
    data = gpu_check.CheckData(shards=tmp_path / "no_shards", cache=tmp_path / "cache",
                               teacher_checkpoint=tmp_path / "none.pt", teacher_arch="ViT-L-14")
    plan = gpu_check.Plan(engine="torch", loader="torch", optimizer="adamw", cuda=False, smoke=True)
    record = gpu_check.run_variant(gpu_check.Variant.parse("zero2-cache-eager-sdpa"), data, gpu_check.SMOKE, plan,
                                   tmp_path, timeout=300, keep=False)
    assert record["status"] == "failed" and record["returncode"] == 2, record
    assert record["error"].startswith("exit code 2\n") and "gpu_check (pure-torch steps): " in record["error"], record


def test_without_cuda_the_full_check_skips_every_variant_and_exits_0(tmp_path, capsys):
    out = tmp_path / "full.json"
    assert gpu_check.main(["--out", str(out), "--work", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["variants"]] == [v.name for v in gpu_check.DEFAULT_VARIANTS]
    assert all(r["status"] == "skipped" and "no CUDA device" in r["reason"] for r in result["variants"])
    assert result["flops_per_image"] > 1e11  # iTPN-L at 224 px, counted on the meta device
    assert not (tmp_path / "work" / "shards").exists()  # nothing prepared for nothing to run
    assert "no variant could run here" in capsys.readouterr().err


def test_missing_packages_change_the_plan_and_say_so():
    env = {"cuda": None, "deepspeed": None, "dali": None, "open_clip": "3.3.0"}
    plan = gpu_check.make_plan(env, "auto", "auto", smoke=True)
    assert (plan.engine, plan.loader, plan.optimizer, plan.blocker) == ("torch", "torch", "adamw", None)
    assert any("DeepSpeed is not installed" in n for n in plan.notes)
    assert any("DALI is not installed" in n for n in plan.notes)
    blocked = gpu_check.make_plan({**env, "open_clip": None}, "auto", "auto", smoke=True)
    assert "open_clip is not installed" in gpu_check.skip_reason(gpu_check.SMOKE_VARIANTS[0], blocked)


def test_variant_names_round_trip_and_a_bad_one_is_a_usage_error(capsys):
    assert all(gpu_check.Variant.parse(v.name) == v for v in gpu_check.ALL_VARIANTS + gpu_check.DEFAULT_VARIANTS)
    assert len(gpu_check.ALL_VARIANTS) == 16
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--variants", "zero1-cache-eager-sdpa"])
    assert exit_info.value.code == 2
    assert "--variants 'zero1-cache-eager-sdpa': expected" in capsys.readouterr().err
