"""CLIP teacher targets: the frozen teacher (``clip``) and the Arrow cache of its targets (``cache``).

``load_teacher`` builds the online teacher the engine calls; ``TeacherCache`` is the ``ViewSource`` the
pre-training pipeline replays cached views and targets from (docs/teacher_cache.md).
"""
from __future__ import annotations

from pathlib import Path

import torch

from itpn_ds.teacher.cache import CacheError, TeacherCache
from itpn_ds.teacher.clip import ClipTeacher, TeacherIdentity, TeacherLoadError, load_clip_teacher

__all__ = ["CacheError", "ClipTeacher", "TeacherCache", "TeacherIdentity", "TeacherLoadError",
           "load_clip_teacher", "load_teacher"]


def load_teacher(arch: str | None, checkpoint: str | Path, device: str | torch.device = "cpu",
                 resolution: int | None = None) -> ClipTeacher:
    """The engine's entry point (``teacher.arch``, ``teacher.checkpoint``): see ``load_clip_teacher``."""
    return load_clip_teacher(checkpoint, arch=arch, resolution=resolution, device=device)
