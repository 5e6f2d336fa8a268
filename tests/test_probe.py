"""The k-NN probe (itpn_ds/engine/probe.py): the pooled features it reads, its per-class subsets read once over
ranks, the probe inside a pre-training (periodic, at the end, tracked, its best in the checkpoint), the same
probe as ``itpn-ds probe`` over a run, its export and a random initialisation. A pre-training SIGKILLed and
resumed giving the uninterrupted run's probe numbers on 2 ranks (the bank sharded, the candidates gathered) is
test_engine_zero.py's SIGKILL test.
The k-NN arithmetic itself is tested in test_knn.py; the refusals in test_bad_inputs.py."""
from __future__ import annotations

import re
from collections import Counter

import timm
import torch

from itpn_ds.config import load_config
from itpn_ds.data import build_eval_loader
from itpn_ds.data.eval_pipeline import per_class_subset
from itpn_ds.data.shards import Manifest
from itpn_ds.engine.checkpoint import read_checkpoint
from itpn_ds.engine.export import export_checkpoint
from itpn_ds.models import create_model
from itpn_ds.models.pooled import pooled_features
from itpn_ds.tracking.curves import metric_history
from itpn_ds.tracking.journal import Journal
from tests.fixtures.cli import itpn_ds_in_process

PROBE_LINE = re.compile(r"probe at step (\d+): (.*) \(")
SMALL_KS = "probe.ks=[5, 10]"


def probe_args(shards) -> list[str]:
    return [f"probe.train_shards={shards.train}", f"probe.val_shards={shards.held_out}"]


def printed(stdout: str) -> dict[str, float]:
    """``itpn-ds probe``'s line of ``name value`` pairs."""
    words = [line.split() for line in stdout.splitlines() if line.startswith("backbone_")][-1]
    return {name: float(value) for name, value in zip(words[::2], words[1::2])}


def probes_by_step(stdout: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in PROBE_LINE.finditer(stdout)}


def test_pooled_features_are_the_classifier_pooling_input_and_the_coarsest_pyramid_level():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    cfg = load_config("tiny_pretrain_cpu")
    pretrain = create_model(cfg.model.name, **cfg.model.kwargs).eval()
    pooled = pooled_features(pretrain, images)
    levels, _ = pretrain.forward_features(images, torch.zeros(2, 16, dtype=torch.bool))
    assert torch.allclose(pooled["pyramid"], levels[0].flatten(1, 3).mean(1), atol=1e-6)
    cfg = load_config("tiny_finetune_cpu", ["model.kwargs.img_size=64"])
    classifier = timm.create_model(cfg.model.name, **cfg.model.kwargs).eval()
    pooled = pooled_features(classifier, images)
    assert set(pooled) == {"backbone"}  # no pyramid in a classifier
    assert torch.allclose(classifier.fc_norm(pooled["backbone"]),
                          classifier.forward_head(classifier.forward_features(images), pre_logits=True), atol=1e-6)


def test_per_class_subsets_are_bounded_and_depend_on_the_keys_only():
    keys = [f"img{i}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    subset = per_class_subset(keys, labels, 4)
    assert Counter(labels[i] for i in subset) == {0: 4, 1: 4, 2: 4}
    reordered = list(reversed(range(30)))
    again = per_class_subset([keys[i] for i in reordered], [labels[i] for i in reordered], 4)
    assert sorted(keys[reordered[i]] for i in again) == sorted(keys[i] for i in subset)
    assert list(per_class_subset(keys, labels, 0)) == list(range(30))


def test_a_subset_is_read_once_over_two_ranks(demo_shards):
    manifest = Manifest.load(demo_shards)
    subset = per_class_subset(manifest.keys, manifest.labels, 3)
    seen = []
    for rank in (0, 1):
        loader = build_eval_loader(demo_shards, micro_batch=4, img_size=32, rank=rank, world_size=2,
                                   samples=subset, backend="torch")
        seen += [key for batch in loader for key, valid in zip(batch.keys, batch.valid.tolist()) if valid]
    assert sorted(seen) == sorted(manifest.keys[i] for i in subset) and len(seen) == 12


def test_pretraining_probes_every_n_steps_and_at_the_end_tracked_with_its_best(demo_probe_shards, demo_shards,
                                                                              demo_cache, tmp_path):
    run_dir = tmp_path / "run"
    out = itpn_ds_in_process("pretrain", "--config", "tiny_pretrain_cpu", "--run-dir", str(run_dir),
                             f"data.shards={demo_shards}", f"teacher.cache={demo_cache}", "model.kwargs.teacher_dim=32",
                             "data.micro_batch=4", "schedule.max_steps=3", "checkpoint.every_steps=2",
                             *probe_args(demo_probe_shards), "probe.every_steps=2", "tracking.enabled=true")
    assert sorted(probes_by_step(out)) == [2, 3]
    assert "probe best: backbone_k10_top1" in out and "of this attempt's time so far" in out
    history = metric_history(Journal(run_dir / "tracking").history())
    top1 = [value for _, value in history["probe/backbone_k20_top1"]]
    assert [step for step, _ in history["probe/backbone_k20_top1"]] == [2, 3]
    assert all(0 <= v <= 100 for v in top1) and history["probe/seconds"][0][1] > 0
    assert history["probe/best_backbone_k20_top1"][-1][1] == max(top1)
    meta = read_checkpoint(run_dir).meta["trainer"]
    assert meta["probed_step"] == 3 and meta["probe_best"]["probe/backbone_k20_top1"] == max(top1)


def test_probe_command_gives_a_run_and_its_export_the_same_numbers(demo_probe_shards, tiny_pretrain_run, tmp_path):
    run = printed(itpn_ds_in_process("probe", "--checkpoint", str(tiny_pretrain_run), *probe_args(demo_probe_shards)))
    export = export_checkpoint(tiny_pretrain_run, tmp_path / "export")
    exported = printed(itpn_ds_in_process("probe", "--checkpoint", str(export), *probe_args(demo_probe_shards)))
    random_init = printed(itpn_ds_in_process("probe", "--config", "tiny_pretrain_cpu", "model.kwargs.teacher_dim=32",
                                             *probe_args(demo_probe_shards)))
    names = {f"{feature}_k{k}_top{t}" for feature in ("backbone", "pyramid") for k in (10, 20) for t in (1, 5)}
    assert set(run) == set(random_init) == names | {"seconds"}
    assert {n: run[n] for n in names} == {n: exported[n] for n in names}
    queries = 4 * 6
    for value in (v for metrics in (run, random_init) for n, v in metrics.items() if n != "seconds"):
        hits = value * queries / 100  # printed to 4 decimals
        assert 0 <= value <= 100 and abs(hits - round(hits)) < 1e-3
