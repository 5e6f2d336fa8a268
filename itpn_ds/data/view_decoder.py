"""Decode exactly a view's box of each JPEG with DALI and resize it to one or more output sizes.

The box is decoded by ``decoders.image_slice`` (only the box, in source pixels; ``decode="roi"``) or, with
``decode="full"``, the whole image is decoded by ``decoders.image`` and the box cut by ``slice`` (the
GPU's hardware JPEG decoder, nvJPEG's A100/H100 engine, decodes whole images only, so ROI decoding may
run on the CUDA cores or the CPU instead; both give the same pixels). The box is then colour-jittered with the
view's factors (``color_jitter=True``; ``itpn_ds/data/color_jitter.py``), resized once per output,
optionally augmented (first output only) and normalized by ``crop_mirror_normalize``, which also applies
the view's horizontal flip. The same decoder serves the pre-training pipeline (student view, optional
teacher view from the SAME jittered box) and the teacher extraction job, so cached targets are computed
from exactly the pixels training sees.

Devices (``device="auto"`` picks ``gpu`` when CUDA is present, the CPU otherwise):

* ``gpu``: one DALI graph, ``mixed`` (GPU) decoding, DALI resizes, everything on the GPU.
* ``cpu`` (``device_id=None``): DALI's CPU resampling costs about 1.3 ms per 224 px image (2 cores,
  x86-64), three times the box decode, while torch's antialiased uint8 bicubic/bilinear kernels
  (vectorized, PIL's filters) take about 0.2 ms. So with ``torch_resize`` (default), outputs with
  ``cubic``/``linear`` interpolation are resized by torch between a decode graph (box decode and colour
  jitter) and a finishing graph (augment, flip, normalize); other interpolations (``lanczos``, ...) are
  resized by DALI in the decode graph. Without any torch-resized output the CPU runs the single graph as
  the GPU does.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from itpn_ds.data.color_jitter import jitter_dali
from itpn_ds.data.views import CropView

if TYPE_CHECKING:
    from PIL import Image

DEVICES = ("auto", "cpu", "gpu")
DECODE_MODES = ("roi", "full")  # decode only the view's box, or the whole image then crop the box
INTERPOLATIONS = ("linear", "cubic", "lanczos", "triangular", "nn")
TORCH_RESIZE = {"cubic": "bicubic", "linear": "bilinear"}  # interpolations the CPU path resizes with torch


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


class SampleAugment(Protocol):
    """An augmentation of the first decoder output whose randomness is a per-sample parameter array
    drawn from (seed, sample key, epoch), so a resumed run replays it. Both decoders apply it to the
    resized uint8 image, before the flip and the normalization."""

    def draw(self, seed: int, key: str, epoch: int) -> np.ndarray:
        """The sample's parameters (an int32 array of a fixed shape)."""
        ...

    def dali(self, images: Any, params: Any) -> Any:
        """DALI graph: uint8 HWC images node, params node (the drawn arrays) -> uint8 HWC node."""
        ...

    def pil(self, image: Image.Image, params: np.ndarray) -> Image.Image:
        """The same augmentation on one PIL RGB image."""
        ...


def _dali_interp(name: str):
    from nvidia.dali import types

    return {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC, "lanczos": types.INTERP_LANCZOS3,
            "triangular": types.INTERP_TRIANGULAR, "nn": types.INTERP_NN}[name]


class ViewDecoder:
    """Decode the boxes of a batch of JPEGs into float32 RGB tensors (B, 3, S, S).

    outputs:     [(size, interp[, mean, std]), ...] or ViewOutputs: one (B, 3, size, size) float32 tensor
                 per entry, all from the same box; normalized where mean/std are given.
    batch_size:  the largest batch ``decode`` accepts (smaller batches are fine).
    num_threads: DALI CPU threads per graph (and torch resize threads).
    augment:     optional :class:`SampleAugment` applied to the FIRST output after its resize; ``decode``
                 then takes each sample's drawn parameters, so its result depends only on them.
    torch_resize: CPU only: resize ``cubic``/``linear`` outputs with torch (False: everything in DALI).
    color_jitter: apply each view's jitter factors (``CropView.jitter``) to the decoded box, before every
                  resize. False builds the graphs without the jitter ops and refuses views that carry factors.
    decode:      ``roi`` (decode only the box, ``decoders.image_slice``) or ``full`` (decode the whole image,
                 then ``slice`` the box): the same pixels; which is faster depends on the decoder hardware.
    """

    def __init__(self, outputs: Sequence[tuple[int, str] | ViewOutput], device: str = "auto", batch_size: int = 32,
                 num_threads: int = 2, device_id: int | None = None, augment: SampleAugment | None = None,
                 torch_resize: bool = True, color_jitter: bool = False, decode: str = "roi") -> None:
        if not outputs:
            raise ValueError("ViewDecoder needs at least one output")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.decode_mode = decode
        self.outputs = [o if isinstance(o, ViewOutput) else ViewOutput(*o) for o in outputs]
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.augment = augment
        self.color_jitter = color_jitter
        self._num_threads = num_threads
        self._gpu_id = None
        if self.device == "gpu":
            self._gpu_id = torch.cuda.current_device() if device_id is None else device_id
        # True where torch resizes the output between the decode and the finishing graphs
        self._torch_resized = [self.device == "cpu" and torch_resize and o.interp in TORCH_RESIZE
                               for o in self.outputs]
        self._resize_pool = ThreadPoolExecutor(num_threads, "view-resize") if any(self._torch_resized) else None
        self._build_pipelines()

    def _build_pipelines(self) -> None:
        """(Re)build the DALI graphs: at start-up, and after a run failed (DALI then declares the pipeline
        object no longer valid; running it again can crash the process)."""
        conditionals = self.augment is not None
        self._decode_pipe = None
        if self._resize_pool is not None:
            self._decode_pipe = self._pipeline(self._decode_graph, False)
            self._finish_pipe = self._pipeline(self._finish_graph, conditionals)
        else:
            self._finish_pipe = self._pipeline(self._whole_graph, conditionals)

    # --- graphs
    def _pipeline(self, graph, conditionals: bool):
        from nvidia.dali import pipeline_def

        pipe = pipeline_def(graph, batch_size=self.batch_size, num_threads=self._num_threads,
                            device_id=self._gpu_id, prefetch_queue_depth=1, exec_dynamic=True,
                            enable_conditionals=conditionals)()
        pipe.build()
        return pipe

    def _decode_box(self):
        """external sources ``encoded`` (bytes), ``anchor`` (x, y) and ``shape`` (w, h) in source px ->
        the decoded box, uint8 HWC (``decode_mode``: only the box decoded, or the whole image then sliced)."""
        from nvidia.dali import fn, types

        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
        shape = fn.external_source(name="shape", dtype=types.FLOAT)
        device = "mixed" if self.device == "gpu" else "cpu"
        box = dict(axis_names="WH", normalized_anchor=False, normalized_shape=False)
        if self.decode_mode == "roi":
            return fn.decoders.image_slice(encoded, anchor, shape, device=device, output_type=types.RGB, **box)
        image = fn.decoders.image(encoded, device=device, output_type=types.RGB)
        return fn.slice(image, anchor, shape, **box)

    def _box(self):
        """The box every output is resized from: decoded, then with ``color_jitter`` jittered by the
        external source ``jitter`` ((3,) float32 factors per sample), uint8 HWC."""
        from nvidia.dali import fn, types

        box = self._decode_box()
        if not self.color_jitter:
            return box
        return jitter_dali(box, fn.external_source(name="jitter", dtype=types.FLOAT))

    @staticmethod
    def _dali_resize(image, output: ViewOutput):
        from nvidia.dali import fn

        return fn.resize(image, size=(output.size, output.size), interp_type=_dali_interp(output.interp),
                         antialias=True)

    def _finish(self, images: list):
        """Resized uint8 HWC images (one node per output) -> augmented (first output), flipped
        (external source ``flip``) and normalized float CHW outputs."""
        from nvidia.dali import fn, types

        flip = fn.external_source(name="flip", dtype=types.INT32)
        if self.augment is not None:
            images = [self.augment.dali(images[0], fn.external_source(name="params", dtype=types.INT32)),
                      *images[1:]]
        outs = []
        for image, output in zip(images, self.outputs):
            mean, std = output.scaled_mean_std()
            outs.append(fn.crop_mirror_normalize(image, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
                                                 mean=mean, std=std))
        return tuple(outs)

    def _whole_graph(self):
        """GPU, or CPU without torch resizes: decode (+ jitter), DALI resizes and finish in one graph."""
        box = self._box()
        return self._finish([self._dali_resize(box, o) for o in self.outputs])

    def _decode_graph(self):
        """With torch resizes: the (jittered) box + the DALI-resized outputs."""
        box = self._box()
        return (box, *[self._dali_resize(box, o) for o, t in zip(self.outputs, self._torch_resized) if not t])

    def _finish_graph(self):
        """With torch resizes: external sources ``image{k}`` (resized uint8 HWC per output) -> finish."""
        from nvidia.dali import fn, types

        return self._finish([fn.external_source(name=f"image{k}", dtype=types.UINT8, layout="HWC")
                             for k in range(len(self.outputs))])

    # --- running
    def decode(self, encoded: Sequence[np.ndarray | bytes], views: Sequence[CropView],
               params: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]:
        """One (B, 3, S, S) float32 tensor per output ([0, 1] or normalized); B = len(encoded) <= batch_size.
        ``params``: each sample's augmentation parameters (``augment.draw``), required with an augment.

        Raises ``RuntimeError`` when a JPEG cannot be decoded (data without a JPEG start marker is refused
        before DALI sees it); the graphs are then rebuilt, so callers that must survive bad samples can
        decode one at a time after a batch failed.
        """
        check_decode_args(encoded, views, params, self.batch_size, self.augment, self.color_jitter)
        check_jpeg_markers(encoded)
        try:
            return self._decode(encoded, views, params)
        except RuntimeError:
            self._build_pipelines()
            raise

    def _decode(self, encoded: Sequence[np.ndarray | bytes], views: Sequence[CropView],
                params: Sequence[np.ndarray] | None) -> list[torch.Tensor]:
        box_feed = {"encoded": [np.frombuffer(e, dtype=np.uint8) if isinstance(e, (bytes, bytearray, memoryview))
                                else np.asarray(e, dtype=np.uint8) for e in encoded],
                    "anchor": [np.array([v.x, v.y], dtype=np.float32) for v in views],
                    "shape": [np.array([v.w, v.h], dtype=np.float32) for v in views]}
        if self.color_jitter:
            box_feed["jitter"] = [v.jitter.as_array() for v in views]
        finish_feed: dict[str, Any] = {"flip": [np.array(int(v.flip), dtype=np.int32) for v in views]}
        if params is not None:
            finish_feed["params"] = [np.asarray(p, dtype=np.int32) for p in params]
        if self._decode_pipe is None:
            outs = _run(self._finish_pipe, {**box_feed, **finish_feed})
        else:
            outs = _run(self._finish_pipe, {**finish_feed, **self._resized(_run(self._decode_pipe, box_feed))})
        return [_to_tensor(out) for out in outs]

    def _resized(self, decoded: tuple) -> dict[str, Any]:
        """The decode graph's outputs -> the finishing graph's ``image{k}`` inputs, the box resized by
        torch (on the thread pool) for the outputs that DALI did not resize."""
        box, *rest = decoded
        return {f"image{k}": list(self._resize_pool.map(partial(_torch_resize, output=output), box)) if by_torch
                else rest.pop(0) for k, (output, by_torch) in enumerate(zip(self.outputs, self._torch_resized))}


def check_decode_args(encoded: Sequence[Any], views: Sequence[CropView], params: Sequence[np.ndarray] | None,
                      batch_size: int, augment: SampleAugment | None, color_jitter: bool) -> None:
    """The checks every decoder's ``decode`` makes on its arguments (``ValueError``)."""
    if len(encoded) != len(views):
        raise ValueError(f"{len(encoded)} images but {len(views)} views")
    if not 0 < len(encoded) <= batch_size:
        raise ValueError(f"batch of {len(encoded)} images, the decoder takes 1..{batch_size}")
    if (params is None) != (augment is None):
        raise ValueError("augmentation parameters are needed exactly when the decoder has an augment")
    if params is not None and len(params) != len(views):
        raise ValueError(f"{len(params)} augmentation parameter arrays for {len(views)} views")
    if not color_jitter and not all(v.jitter.is_identity for v in views):
        raise ValueError("views carry colour-jitter factors but the decoder was built without color_jitter=True")


JPEG_SOI = b"\xff\xd8\xff"


def check_jpeg_markers(encoded: Sequence[np.ndarray | bytes]) -> None:
    """``RuntimeError`` naming the batch position of data that does not start like a JPEG (zeroed or
    overwritten header): DALI's decoders are never handed it."""
    for i, data in enumerate(encoded):
        head = bytes(memoryview(data)[:3]) if isinstance(data, (bytes, bytearray, memoryview)) else \
            np.asarray(data, dtype=np.uint8)[:3].tobytes()
        if head != JPEG_SOI:
            raise RuntimeError(f"batch position {i}: not a JPEG (no start-of-image marker, got {head.hex()})")


def _run(pipe, feed: dict[str, Any]) -> tuple:
    for name, data in feed.items():
        pipe.feed_input(name, data)
    return pipe.run()


def _torch_resize(box, output: ViewOutput) -> np.ndarray:
    """One decoded box (DALI (h, w, 3) uint8 tensor) -> (S, S, 3) uint8, antialiased bicubic/bilinear by
    torch's vectorized uint8 kernel, which follows PIL's filters.

    The box is a zero-copy view; as one channels-last (1, 3, h, w) image the kernel runs on the calling
    thread without an OpenMP region (no torch worker threads spinning against DALI's) and without the GIL,
    so a thread pool resizes a batch in parallel."""
    image = torch.from_dlpack(box)[None].permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=(output.size, output.size), mode=TORCH_RESIZE[output.interp], antialias=True)
    return resized[0].permute(1, 2, 0).numpy()


def _to_tensor(out) -> torch.Tensor:
    """DALI TensorList (B x (3, S, S) float32, CPU or GPU) -> (B, 3, S, S) torch tensor on its device.

    CPU: zero-copy (DLPack); the dynamic executor hands each run fresh output buffers, which live as
    long as the tensor does. GPU: copied on torch's current stream."""
    dense = out.as_tensor()
    if type(out).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = torch.empty(dense.shape(), dtype=torch.float32, device="cuda")
        feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream())
        return tensor
    return torch.from_dlpack(dense)
