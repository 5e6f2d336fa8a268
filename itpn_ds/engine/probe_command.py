"""``itpn-ds probe``: pre-training's k-NN probe (``itpn_ds.engine.probe``) of any checkpoint or export, after the
fact, so runs can be compared on the same shards; or of the model at its random initialisation (the baseline).

    itpn-ds probe --checkpoint CKPT probe.train_shards=TRAIN probe.val_shards=VAL [--config RECIPE] [key=value ...]
    itpn-ds probe --config RECIPE probe.train_shards=TRAIN probe.val_shards=VAL [key=value ...]   (random init)

CKPT: a run directory, its checkpoints/ or a step directory (any ZeRO stage), an export directory or
``.safetensors`` file, or a published ``.pth``. The model is the one stored with the weights (``meta.json`` /
``config.json``) where they store one, else the recipe's (``model.*``); without ``--checkpoint`` the recipe's
model initialised from ``schedule.seed``. Prints one line: ``name value`` pairs, top-1 / top-5 (%) of each pooled
feature and k (``backbone_k20_top1 ...``), then the seconds it took.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from itpn_ds.config import ConfigError, RunConfig, load_config
from itpn_ds.engine.checkpoint import CheckpointError, read_meta
from itpn_ds.engine.commands import LOG_FORMAT, init_from
from itpn_ds.engine.export import METADATA, WEIGHTS
from itpn_ds.engine.model import build_model
from itpn_ds.engine.probe import build_probe
from itpn_ds.engine.runtime import init_distributed, make_deterministic, seed_everything


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", default=None, help="recipe name (itpn_ds/recipes) or YAML path: the probe's "
                        "settings, and the model where the weights store none")
    parser.add_argument("--checkpoint", default=None, help="run, checkpoint or export directory, .safetensors or "
                        ".pth; none: the recipe's model at its random initialisation")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (probe.train_shards=DIR ...)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    cfg = load_config(args.config, args.overrides)
    if not cfg.probe.enabled:
        raise ConfigError("itpn-ds probe needs probe.train_shards and probe.val_shards (labelled classification "
                          "shards: itpn-ds make-shards)")
    if args.checkpoint:
        cfg = with_stored_model(cfg, args.config, args.overrides, Path(args.checkpoint))
    runtime = init_distributed()
    make_deterministic()
    seed_everything(cfg.schedule.seed)
    model = build_model(cfg)
    probe = build_probe(cfg, runtime.rank, runtime.world_size, runtime.device, model)
    if args.checkpoint:
        init_from(model, args.checkpoint, strict=True)
    start = time.perf_counter()
    metrics = probe.measure(model.to(runtime.device))
    if runtime.rank == 0:
        print(" ".join(f"{name[len('probe/'):]} {value:.4f}" for name, value in metrics.items())
              + f" seconds {time.perf_counter() - start:.2f}")
    return 0


def with_stored_model(cfg: RunConfig, recipe: str | None, overrides: list[str], source: Path) -> RunConfig:
    """``cfg`` with ``model.name`` / ``model.kwargs`` of the model stored with the weights at ``source`` (those
    given on the command line win); ``cfg`` itself where none is stored (a ``.pth``)."""
    stored = stored_model(source)
    if stored is None:
        return cfg
    name, kwargs = stored
    return load_config(recipe, [f"model.name={name}", f"model.kwargs={json.dumps(kwargs)}", *overrides])


def stored_model(source: Path) -> tuple[str, dict[str, Any]] | None:
    """(timm name, constructor keywords) stored with the weights at ``source``: an export's ``config.json``, a
    checkpoint's ``meta.json``; None for a file that stores none."""
    export_dir = source.parent if source.name == WEIGHTS else source
    if (export_dir / METADATA).is_file():
        try:
            meta = json.loads((export_dir / METADATA).read_text())
            return meta["architecture"], meta["model_kwargs"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{export_dir / METADATA} names no model (architecture, model_kwargs): "
                                  f"{exc}") from exc
    if source.is_file():
        return None
    _, meta = read_meta(source)
    return meta["model"]["name"], meta["model"]["kwargs"]
