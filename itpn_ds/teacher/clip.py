"""The frozen CLIP teacher of CLIP-distillation pre-training.

Target (per image): ``layer_norm_without_affine(ln_post(patch_tokens) @ visual.proj)``, shape (T, D), with
T = (resolution / patch)^2 patch tokens (the CLS token is dropped) and D the CLIP embedding width
(768 for ViT-L/14, 512 for ViT-B/16).

Input normalization: the images are RGB in [0, 1] and are normalized here with the CLIP mean/std
(``CLIP_MEAN``/``CLIP_STD``), as CLIP was trained. The published iTPN code rescales them as if they were
in [-1, 1], which hands CLIP washed-out images; we do not reproduce that (docs/teacher_cache.md).

Checkpoints are read from a local file only (nothing is ever downloaded):

* an OpenAI TorchScript archive (``ViT-L-14.pt`` as OpenAI released it): its state dict is read and a plain
  (non-JIT) open_clip model is built from it;
* a plain OpenAI-format state dict (same parameter names, no TorchScript), ``arch`` None or ``"openai"``:
  the architecture is read off the tensor shapes;
* an open_clip checkpoint (``{"state_dict": ...}`` from open_clip training, or a bare state dict) together
  with ``arch``: an open_clip model-config name (``ViT-B-16``) or a model-config JSON file (tiny configs).

OpenAI-format weights go through open_clip's OpenAI loader, which rounds them through fp16 as OpenAI's
releases are fp16; they are then kept in float32 and run under bf16 autocast on CUDA.
"""
from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from itpn_ds.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATION = "clip-mean-std"
OPENAI_ARCH = "openai"
# Teacher input size when none is asked for: a token grid of 14 x 14, the grid of a 224 px / patch-16
# student (ViT-L/14 at 196 px). Any other architecture runs at its native resolution.
DEFAULT_RESOLUTIONS = {"ViT-L-14": 196, "ViT-B-16": 224}
# Buffers a traced CLIP archive stores besides the weights; not part of the model's state dict.
TORCHSCRIPT_BUFFERS = ("attn_mask",)
# OpenAI releases by their vision tower's (width, layers, patch): lets a TorchScript archive be named.
OPENAI_VISION_SHAPES = {(1024, 24, 14): "ViT-L-14", (768, 12, 16): "ViT-B-16", (768, 12, 32): "ViT-B-32"}


class TeacherLoadError(UserError, RuntimeError):
    """A teacher checkpoint that cannot be used: names the file and what to do."""


@dataclass(frozen=True)
class TeacherIdentity:
    """What makes two teachers' targets interchangeable: architecture, checkpoint bytes, input size and
    input normalization. Stored in every cache file and checked when a cache is opened."""

    arch: str
    checkpoint_sha256: str
    resolution: int
    normalization: str = NORMALIZATION

    def as_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "checkpoint_sha256": self.checkpoint_sha256, "resolution": self.resolution,
                "normalization": self.normalization}


class ClipTeacher(nn.Module):
    """CLIP image tower -> patch-token targets. Frozen and in eval mode.

    forward(images (B, 3, R, R) RGB in [0, 1], R = ``resolution``) -> (B, T, D) float32,
    T = ``num_tokens``, D = ``dim``. No gradients; bf16 autocast when the images are on CUDA.
    """

    def __init__(self, visual: nn.Module, identity: TeacherIdentity) -> None:
        super().__init__()
        self.visual = visual
        self.visual.output_tokens = True
        self.identity = identity
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def resolution(self) -> int:
        return self.identity.resolution

    @property
    def patch_size(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    @property
    def num_tokens(self) -> int:
        return (self.resolution // self.patch_size) ** 2

    @property
    def dim(self) -> int:
        return int(self.visual.proj.shape[1])

    def train(self, mode: bool = True) -> "ClipTeacher":
        """Always eval: the teacher is frozen (dropout and friends stay off)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"teacher {self.identity.arch} takes (B, 3, {self.resolution}, {self.resolution}) "
                             f"images in [0, 1], got {tuple(images.shape)}")
        x = (images.float() - self.mean) / self.std
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            _, tokens = self.visual(x)  # (B, T, width), after ln_post
            projected = tokens @ self.visual.proj
        projected = projected.float()
        return F.layer_norm(projected, projected.shape[-1:])


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_clip_teacher(checkpoint: str | Path, arch: str | None = None, resolution: int | None = None,
                      device: str | torch.device = "cpu") -> ClipTeacher:
    """Build the frozen teacher from a local checkpoint file (see the module docstring for the formats).

    arch:       None / ``"openai"`` (OpenAI format, shapes read from the file), an open_clip config name, or
                a model-config JSON path. With a TorchScript archive a named arch must match its shapes.
    resolution: teacher input size in px; default ``DEFAULT_RESOLUTIONS`` for the arch, else native. The
                position embedding is resized (bicubic) when it differs from the checkpoint's grid.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise TeacherLoadError(
            f"CLIP checkpoint {path} not found: nothing is downloaded. Put the file there (for ViT-L/14, "
            "OpenAI's ViT-L-14.pt) and pass it with --teacher-checkpoint (extract-teacher) or "
            "teacher.checkpoint (online pre-training).")
    state_dict, torchscript = _read_state_dict(path)
    if torchscript or arch in (None, OPENAI_ARCH):
        visual, arch_name, native = _build_openai(state_dict, path, arch, resolution)
    else:
        visual, arch_name, native = _build_open_clip(state_dict, path, arch, resolution)
    identity = TeacherIdentity(arch=arch_name, checkpoint_sha256=file_sha256(path), resolution=native)
    return ClipTeacher(visual, identity).to(device)


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict with any ``module.`` prefix removed, whether the file is a TorchScript archive)."""
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit.load is deprecated; it is only used to read the weights
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), True
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of many kinds
        raise TeacherLoadError(f"{path}: not a readable torch checkpoint: {exc}") from exc
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise TeacherLoadError(f"{path}: expected a CLIP state dict (name -> tensor), got {type(raw).__name__}")
    return {k.removeprefix("module."): v for k, v in raw.items()}, False


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _build_openai(state_dict: dict[str, torch.Tensor], path: Path, arch: str | None,
                  resolution: int | None) -> tuple[nn.Module, str, int]:
    from open_clip.model import build_model_from_openai_state_dict

    if "visual.proj" not in state_dict or "visual.conv1.weight" not in state_dict:
        raise TeacherLoadError(f"{path}: not an OpenAI-format CLIP ViT state dict (no visual.proj / "
                               "visual.conv1.weight); give --teacher-arch for an open_clip checkpoint")
    shape = (state_dict["visual.conv1.weight"].shape[0],
             sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in state_dict),
             state_dict["visual.conv1.weight"].shape[-1])
    known = OPENAI_VISION_SHAPES.get(shape)
    if arch not in (None, OPENAI_ARCH) and arch != known:
        raise TeacherLoadError(f"{path}: OpenAI checkpoint with vision width/layers/patch {shape} "
                               f"({known or 'no named architecture'}) does not match arch {arch!r}")
    name = known or f"vit-w{shape[0]}-l{shape[1]}-p{shape[2]}"
    native_grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    res = resolution or DEFAULT_RESOLUTIONS.get(name, native_grid * shape[2])
    state_dict = {k: v for k, v in state_dict.items() if k not in TORCHSCRIPT_BUFFERS}
    state_dict["visual.positional_embedding"] = resize_pos_embed(state_dict["visual.positional_embedding"],
                                                                 _grid(res, shape[2], path))
    model = build_model_from_openai_state_dict(state_dict, cast_dtype=torch.float32)
    return model.visual.float(), f"{OPENAI_ARCH}:{name}", res


def _build_open_clip(state_dict: dict[str, torch.Tensor], path: Path, arch: str,
                     resolution: int | None) -> tuple[nn.Module, str, int]:
    from open_clip.model import CLIP
    from open_clip.model import resize_pos_embed as open_clip_resize_pos_embed

    config = _model_config(arch)
    vision = dict(config["vision_cfg"])
    res = resolution or DEFAULT_RESOLUTIONS.get(arch, int(vision["image_size"]))
    _grid(res, int(vision["patch_size"]), path)
    vision["image_size"] = res
    if config.get("custom_text") or "hf_model_name" in config.get("text_cfg", {}):
        raise TeacherLoadError(f"arch {arch!r}: only CLIP models with the standard text tower are supported")
    model = CLIP(**{k: v for k, v in config.items() if k != "custom_text"} | {"vision_cfg": vision})
    # float32 first: the model is built in float32, and open_clip's resize cannot interpolate a half table
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    open_clip_resize_pos_embed(state_dict, model)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise TeacherLoadError(f"{path} does not fit arch {arch!r}: {exc}") from exc
    return model.visual.float(), Path(arch).stem if arch.endswith(".json") else arch, res


def _model_config(arch: str) -> dict[str, Any]:
    """open_clip model config from a registered name or a JSON file (``model_cfg`` key or the config)."""
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise TeacherLoadError(f"model config {path} not found")
        raw = json.loads(path.read_text())
        return raw.get("model_cfg", raw)
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise TeacherLoadError(f"unknown open_clip architecture {arch!r} (known: ViT-L-14, ViT-B-16, ... see "
                               "open_clip.list_models()), or pass a model-config JSON path")
    return config


def _grid(resolution: int, patch: int, path: Path) -> int:
    if resolution % patch:
        raise TeacherLoadError(f"{path}: teacher resolution {resolution} is not a multiple of the patch size {patch}")
    return resolution // patch


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, C) class + grid position embedding -> (1 + grid*grid, C), grid part resized bicubically."""
    old = round((pos_embed.shape[0] - 1) ** 0.5)
    if old == grid:
        return pos_embed
    cls, patches = pos_embed[:1], pos_embed[1:].float()
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=old > grid)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls, patches])
