"""The batch every loader yields and every engine task consumes."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, Protocol

import torch


@dataclass
class Batch:
    """One micro-batch on one rank. B = micro-batch size, N = patches per image, T/D = teacher tokens/dim.

    images:          (B, 3, H, W) float32, normalized with the student's mean/std.
    keys:            B sample keys (shard manifest keys).
    labels:          (B,) int64 class ids, or (B, num_classes) float soft targets after mixup/cutmix.
    bool_masked_pos: (B, N) bool, True = masked patch (pre-training).
    view_ids:        (B,) int64 view id of each sample (pre-training).
    teacher_images:  (B, 3, R, R) float32 RGB in [0, 1] at the teacher's resolution (online teacher only).
    targets:         (B, T, D) float32 cached teacher targets (cached teacher only).
    valid:           (B,) bool; False marks padding that fills the epoch's last step so that every rank
                     takes the same number of steps. Losses and metrics ignore padded samples.
    label_maps:      (B, H, W) int64 segmentation training ids, 255 = ignore (also the padding);
                     training: aligned with ``images``; evaluation: at the original resolution.
    image_sizes:     (B, 2) int64 (h, w) of each image in ``images`` before padding (segmentation eval).
    label_sizes:     (B, 2) int64 (h, w) of each label map in ``label_maps`` before padding (segmentation eval).
    """

    images: torch.Tensor
    keys: list[str]
    labels: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    view_ids: torch.Tensor | None = None
    teacher_images: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    label_maps: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    label_sizes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def for_model(self, device: torch.device | str, dtype: torch.dtype) -> "Batch":
        """On ``device``, ``images`` in ``dtype`` (the model's parameters': DeepSpeed does not cast inputs);
        ``teacher_images`` in fp32, the teacher's own dtype."""
        batch = self.to(device)
        batch.images = batch.images.to(dtype)
        if batch.teacher_images is not None:
            batch.teacher_images = batch.teacher_images.float()
        return batch


class Loader(Protocol):
    """What the engine needs from an input pipeline (DALI or the torch fallback)."""

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch, from the saved position on."""
        ...

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
