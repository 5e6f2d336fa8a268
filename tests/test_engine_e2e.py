"""The whole chain on the CPU with real components: demo shards -> CLIP targets extracted into an Arrow cache
-> iTPN pre-training from the cache on 2 DeepSpeed ZeRO-2 ranks -> fine-tuning from that checkpoint ->
export -> the export loaded as timm's ``local-dir:`` scores what the engine's evaluation of the checkpoint reports."""
import json
import re
import subprocess
import sys

import pytest
import timm
import torch

import itpn_ds.models  # noqa: F401  (registers the timm names)
from itpn_ds.data import build_eval_loader
from itpn_ds.engine.tasks.classify import evaluate_classifier
from itpn_ds.teacher.extract import ExtractConfig, extract_cache
from tests.fixtures.cli import REPO, itpn_ds_cli, itpn_ds_in_process, losses_by_step, run_in_process
from tests.fixtures.teacher import write_tiny_clip_checkpoint

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def chain(demo_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    clip = write_tiny_clip_checkpoint(root / "clip.pt", embed_dim=64)  # teacher_dim of the tiny recipe
    cache = root / "cache"
    extract_cache(ExtractConfig(shards=demo_shards, out=cache, checkpoint=clip, num_views=2, seed=0,
                                batch_size=16, progress=False))
    pretrain = itpn_ds_cli("pretrain", "--config", "tiny_pretrain_cpu", "--run-dir", str(root / "pretrain"),
                           f"data.shards={demo_shards}", f"teacher.cache={cache}", "schedule.epochs=3",
                           f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "tracking.experiment=e2e", ranks=2)
    finetune = itpn_ds_cli("finetune", "--config", "tiny_finetune_cpu", "--run-dir", str(root / "finetune"),
                           f"data.shards={demo_shards}", f"data.val_shards={demo_shards}",
                           f"finetune.init={root / 'pretrain'}", "tracking.enabled=false", ranks=2)
    itpn_ds_in_process("export", "--checkpoint", str(root / "finetune"), "--out", str(root / "export"))
    return dict(root=root, shards=demo_shards, pretrain=pretrain, finetune=finetune)


def test_pretraining_from_the_cache_lowers_the_loss(chain):
    losses = losses_by_step(chain["pretrain"])
    steps = sorted(losses)
    assert len(steps) >= 6
    assert losses[steps[-1]] < 0.8 * losses[steps[0]], losses


def test_finetuning_from_our_pretraining_checkpoint_beats_chance(chain):
    top1 = [float(x) for x in re.findall(r"'top1': ([0-9.]+)", chain["finetune"])]
    assert top1 and top1[-1] > 100 / 4 + 10, top1  # 4 classes: chance is 25 %


def test_export_loads_in_timm_and_scores_like_the_checkpoint(chain):
    export = chain["root"] / "export"
    meta = json.loads((export / "config.json").read_text())
    model = timm.create_model(f"local-dir:{export}", pretrained=True)  # timm's local-dir format
    assert model.num_classes == meta["num_classes"] and model.img_size == meta["img_size"]
    loader = build_eval_loader(chain["shards"], micro_batch=8, img_size=meta["img_size"], num_threads=1)
    exported = evaluate_classifier(model, loader, torch.device("cpu"), None)
    printed = itpn_ds_in_process("evaluate", "--config", "tiny_finetune_cpu", "--checkpoint",
                                 str(chain["root"] / "finetune"), f"data.val_shards={chain['shards']}",
                                 "tracking.enabled=false")
    top1 = float(re.search(r"top1 ([0-9.]+)", printed).group(1))
    assert exported["top1"] == pytest.approx(top1, abs=1e-6)
    assert exported["samples"] > 0


def test_pretraining_run_is_tracked_in_mlflow_with_config_curves_and_model(chain):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{chain['root'] / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "clip_tpn_base_3324_patch16_224"
    assert run.data.params["ds_config.zero_optimization.stage"] == "2"  # the resolved DeepSpeed JSON
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == len(losses_by_step(chain["pretrain"]))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"config.yaml", "model/model.safetensors", "model/config.json"} <= artifacts, artifacts
    assert any(a.startswith("plots") for a in artifacts)


def test_pretraining_refuses_a_cache_made_with_another_teacher(chain, tmp_path):
    other = write_tiny_clip_checkpoint(tmp_path / "other_clip.pt", embed_dim=64, seed=1)
    proc = run_in_process("pretrain", "--config", "tiny_pretrain_cpu", "--run-dir", str(tmp_path / "run"),
                          f"data.shards={chain['shards']}", f"teacher.cache={chain['root'] / 'cache'}",
                          f"teacher.checkpoint={other}", "tracking.enabled=false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "itpn-ds pretrain:" in proc.stderr and "checkpoint_sha256" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_finetuning_on_two_ranks_reads_the_pretraining_checkpoint_once(chain):
    """Rank 0 reads (and consolidates) the ZeRO-2 pre-training checkpoint; rank 1 receives the loaded weights."""
    readers = re.findall(r"itpn_ds\.engine: rank (\d+) read .*/pretrain: ", chain["finetune"])
    assert readers == ["0"], readers
    assert "rank 1 received the initial weights of" in chain["finetune"]


def test_broadcast_start_up_gives_each_rank_the_weights_a_rank_reading_itself_gets(chain, tmp_path):
    """benchmarks/startup.py on 2 ranks from the chain's ZeRO-2 run, rank 0 reading and broadcasting: both ranks
    end with, bit for bit, the weights of a model initialised here by reading the checkpoint itself (the path
    every rank took before); rank 1 reads next to nothing (its process's own read count, /proc/self/io)."""
    from benchmarks.startup import weights_digest
    from itpn_ds.config import load_config
    from itpn_ds.engine.model import build_model
    from itpn_ds.engine.commands import load_on_this_rank
    from itpn_ds.engine.runtime import seed_everything

    run = chain["root"] / "pretrain"
    out = tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, "benchmarks/startup.py", "--checkpoint", str(run), "--finetune-recipe",
                           "tiny_finetune_cpu", "--strategies", "broadcast", "--work", str(tmp_path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.findall(r"itpn_ds\.engine: rank (\d+) read ", proc.stdout) == ["0"]
    cfg = load_config("tiny_finetune_cpu", ["tracking.enabled=false"])
    seed_everything(cfg.schedule.seed)
    model = build_model(cfg)
    load_on_this_rank(model, str(run), strict=False, new_head=False)
    result = json.loads(out.read_text())
    assert [r["weights_sha256"] for r in result["records"]] == [weights_digest(model)] * 2
    read = result["strategies"]["broadcast"]["bytes_read_by_rank"]
    assert read["0"] >= result["checkpoint_bytes"] and read["1"] < 0.05 * read["0"], read
