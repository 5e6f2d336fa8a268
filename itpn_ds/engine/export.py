"""Checkpoint -> one safetensors file + JSON metadata that ``timm.create_model`` loads.

Any ZeRO stage and world size: the fp32 weights are consolidated from the checkpoint's optimizer
partitions (DeepSpeed's ``zero_to_fp32``), or read from the model-states file for ZeRO stage 0.

Output (``OUT`` is a directory, timm's ``local-dir`` format for the classifiers):
    OUT/model.safetensors   fp32 state dict under the model's own parameter names
    OUT/config.json         {"architecture": model name, "model_kwargs": {...}, "img_size", "patch_size",
                             "num_classes", "teacher": {...} | null, "task", "step", "source", and for a
                             task model its class map: "classes" {name: label id}, "category_ids" (detection);
                             for a timm classifier also timm's "model_args" and "pretrained_cfg" (the published
                             evaluation at the exported size, the class names as "label_names")}

Loading::

    import itpn_ds.models, timm
    model = timm.create_model("local-dir:OUT", pretrained=True)        # a classifier: size, classes, weights
    model = itpn_ds.models.create_model(meta["architecture"], pretrained=True,   # any export
                                        pretrained_cfg_overlay=dict(file="OUT/model.safetensors"),
                                        **meta["model_kwargs"])
"""
from __future__ import annotations

import glob
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from itpn_ds.data.class_map import ClassMap
from itpn_ds.engine.checkpoint import META, CheckpointError, CheckpointRef, read_checkpoint, read_meta

WEIGHTS = "model.safetensors"
METADATA = "config.json"


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint of any ZeRO stage / world size (on the CPU)."""
    try:
        state = _read_model_states(ref)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{ref.path}: its DeepSpeed states cannot be read (truncated or damaged: "
                              f"{str(exc).splitlines()[0][:200]}); use an earlier checkpoint") from exc
    return {k: v.float().contiguous() for k, v in state.items()}


def _read_model_states(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    if glob.glob(str(ref.path / "*optim_states.pt")) and ref.meta.get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    else:
        files = sorted(ref.path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{ref.path} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return state


def model_metadata(name: str, kwargs: dict[str, Any], task: str | None, teacher: dict[str, Any] | None, step: int,
                   source: Path, **extra: Any) -> dict[str, Any]:
    """``config.json`` of an export (see the module docstring); ``extra`` adds keys (e.g. ``metrics``)."""
    from itpn_ds.models.registry import local_dir_config

    classes = extra.get("classes")
    label_names = sorted(classes, key=classes.__getitem__) if classes else None
    return {
        **local_dir_config(name, kwargs, label_names),
        "architecture": name,
        "model_kwargs": dict(kwargs),
        "img_size": kwargs.get("img_size", 224),
        "patch_size": kwargs.get("patch_size", 16),
        "num_classes": kwargs.get("num_classes"),
        "teacher": teacher if task == "pretrain" else None,
        "task": task,
        "step": step,
        "source": str(source.resolve()),
        **extra,
    }


def export_metadata(ref: CheckpointRef) -> dict[str, Any]:
    """The export metadata of a checkpoint, from its ``meta.json`` (its class map too, where it stores one)."""
    model = ref.meta["model"]
    classes = ClassMap.from_json(ref.meta, str(ref.path / META))
    return model_metadata(model["name"], model["kwargs"], ref.meta.get("task"), ref.meta.get("teacher"),
                          ref.meta["step"], ref.path, **(classes.to_json() if classes else {}))


def stored_class_map(source: str | Path) -> ClassMap | None:
    """The class map stored with the weights at ``source`` (a run, checkpoints or step directory, an export
    directory or its ``model.safetensors``), read before any weights; None where none is stored (checkpoints and
    exports made before class maps travelled with the weights, a published ``.pth``)."""
    path = Path(source)
    export_dir = path.parent if path.name == WEIGHTS else path
    if (export_dir / METADATA).is_file() and (export_dir / WEIGHTS).is_file():
        try:
            raw = json.loads((export_dir / METADATA).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{export_dir / METADATA} is corrupt: {exc}") from exc
        return ClassMap.from_json(raw, str(export_dir / METADATA))
    if path.is_file():
        return None
    checkpoint, meta = read_meta(path)
    return ClassMap.from_json(meta, str(checkpoint / META))


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` for ``checkpoint`` (a run, checkpoints or step dir)."""
    ref = read_checkpoint(checkpoint)
    state = consolidated_state_dict(ref)
    return write_export(state, export_metadata(ref), out_dir)


def write_export(state: dict[str, torch.Tensor], metadata: dict[str, Any], out_dir: str | Path) -> Path:
    """Write weights and metadata; each file through a temporary name, so a crash leaves no half file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{WEIGHTS}"
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp),
              metadata={"architecture": metadata["architecture"], "format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    tmp_meta = out / f".tmp-{METADATA}"
    tmp_meta.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    os.replace(tmp_meta, out / METADATA)
    return out


def live_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The running engine's full weights on rank 0 (None elsewhere); ZeRO-3 gathers the partitions."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if rank != 0:
        return None
    return {k: v.detach().float().cpu() for k, v in state.items()}


def load_exported(out_dir: str | Path) -> torch.nn.Module:
    """Build the exported model (``itpn_ds.models.create_model``: timm's classifiers and our names)."""
    from itpn_ds.models.registry import create_model

    out = Path(out_dir)
    meta = json.loads((out / METADATA).read_text())
    return create_model(meta["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out / WEIGHTS)),
                        **meta["model_kwargs"])
