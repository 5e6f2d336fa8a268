"""Decode exactly a view's box of each JPEG with DALI and resize it to one or more output sizes.

Graph: ``external_source`` (JPEG bytes, box anchor, box shape, flip flag) -> ``decoders.image_slice``
(decodes only the box, in source pixels) -> ``flip`` -> one ``resize`` per output. The same graph serves
the pre-training pipeline (student view, optional teacher view from the SAME box) and the teacher
extraction job, so cached targets are computed from exactly the pixels training sees.

``device="auto"`` decodes on the GPU (``mixed``) when CUDA is present and on the CPU
(``device_id=None``) otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from itpn_ds.data.views import CropView

DEVICES = ("auto", "cpu", "gpu")
INTERPOLATIONS = ("linear", "cubic", "lanczos", "triangular", "nn")


def resolve_device(device: str) -> str:
    """``cpu`` or ``gpu`` from ``auto``/``cpu``/``gpu`` (``gpu`` needs CUDA)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("device='gpu' but CUDA is not available")
    return device


@dataclass(frozen=True)
class ViewOutput:
    """One output of the decoder: square side in px, resize interpolation and an optional per-channel
    normalization ``(x - mean) / std`` of the [0, 1] pixels (None: the [0, 1] pixels themselves)."""

    size: int
    interp: str = "cubic"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def scaled_mean_std(self) -> tuple[list[float], list[float]]:
        """mean and std in uint8 units, as DALI's crop_mirror_normalize takes them."""
        mean = self.mean if self.mean is not None else (0.0, 0.0, 0.0)
        std = self.std if self.std is not None else (1.0, 1.0, 1.0)
        return [255.0 * m for m in mean], [255.0 * d for d in std]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"output size must be >= 1, got {self.size}")
        if self.interp not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interp!r}")


def _dali_interp(name: str):
    from nvidia.dali import types

    return {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC, "lanczos": types.INTERP_LANCZOS3,
            "triangular": types.INTERP_TRIANGULAR, "nn": types.INTERP_NN}[name]


class ViewDecoder:
    """Decode the boxes of a batch of JPEGs into float32 RGB tensors (B, 3, S, S).

    outputs:     [(size, interp[, mean, std]), ...] or ViewOutputs: one (B, 3, size, size) float32 tensor
                 per entry, all from the same box; normalized in the graph where mean/std are given.
    batch_size:  the largest batch ``decode`` accepts (smaller batches are fine).
    augment:     optional graph function (DALI uint8 HWC node -> node) applied to the FIRST output after
                 its resize, e.g. RandAugment; the pipeline then runs with conditionals enabled. Its random
                 draws follow the pipeline's ``seed`` and run order, not the (sample, epoch).
    """

    def __init__(self, outputs: Sequence[tuple[int, str] | ViewOutput], device: str = "auto", batch_size: int = 32,
                 num_threads: int = 2, device_id: int | None = None, seed: int = 0,
                 augment: Callable[[Any], Any] | None = None) -> None:
        if not outputs:
            raise ValueError("ViewDecoder needs at least one output")
        self.outputs = [o if isinstance(o, ViewOutput) else ViewOutput(*o) for o in outputs]
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self._feed: tuple[list[np.ndarray], ...] | None = None
        self._augment = augment
        gpu_id = (torch.cuda.current_device() if device_id is None else device_id) if self.device == "gpu" else None
        self._pipe = self._build(num_threads, gpu_id, seed)

    def _build(self, num_threads: int, device_id: int | None, seed: int):
        from nvidia.dali import fn, pipeline_def, types

        decode_device = "mixed" if self.device == "gpu" else "cpu"

        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                      prefetch_queue_depth=1, exec_dynamic=True, enable_conditionals=self._augment is not None)
        def graph():
            encoded, anchor, shape, flip = fn.external_source(source=self._next_feed, num_outputs=4, batch=True,
                                                              dtype=[types.UINT8, types.FLOAT, types.FLOAT,
                                                                     types.INT32])
            image = fn.decoders.image_slice(encoded, anchor, shape, device=decode_device, output_type=types.RGB,
                                            axis_names="WH", normalized_anchor=False, normalized_shape=False)
            image = fn.flip(image, horizontal=flip)
            outs = [fn.resize(image, size=(o.size, o.size), interp_type=_dali_interp(o.interp), antialias=True)
                    for o in self.outputs]
            if self._augment is not None:
                outs[0] = self._augment(outs[0])
            return tuple(fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                                  mean=o.scaled_mean_std()[0], std=o.scaled_mean_std()[1])
                         for img, o in zip(outs, self.outputs))

        pipe = graph()
        pipe.build()
        return pipe

    def _next_feed(self):
        if self._feed is None:
            raise RuntimeError("ViewDecoder pipeline ran without a batch fed")
        feed, self._feed = self._feed, None
        return feed

    def decode(self, encoded: Sequence[np.ndarray | bytes], views: Sequence[CropView]) -> list[torch.Tensor]:
        """One (B, 3, S, S) float32 tensor per output ([0, 1] or normalized); B = len(encoded) <= batch_size.

        Raises ``RuntimeError`` from DALI when a JPEG cannot be decoded; callers that must survive bad
        samples check them first (``is_decodable``) or decode one at a time.
        """
        if len(encoded) != len(views):
            raise ValueError(f"{len(encoded)} images but {len(views)} views")
        if not 0 < len(encoded) <= self.batch_size:
            raise ValueError(f"batch of {len(encoded)} images, the decoder takes 1..{self.batch_size}")
        self._feed = (
            [np.frombuffer(e, dtype=np.uint8) if isinstance(e, (bytes, bytearray, memoryview)) else
             np.asarray(e, dtype=np.uint8) for e in encoded],
            [np.array([v.x, v.y], dtype=np.float32) for v in views],
            [np.array([v.w, v.h], dtype=np.float32) for v in views],
            [np.array(int(v.flip), dtype=np.int32) for v in views],
        )
        outs = self._pipe.run()
        return [_to_tensor(out) for out in outs]


def _to_tensor(out) -> torch.Tensor:
    """DALI TensorList (B x (3, S, S) float32, CPU or GPU) -> (B, 3, S, S) torch tensor on its device."""
    dense = out.as_tensor()
    if type(out).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = torch.empty(dense.shape(), dtype=torch.float32, device="cuda")
        feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream())
        return tensor
    return torch.from_numpy(np.array(dense))
