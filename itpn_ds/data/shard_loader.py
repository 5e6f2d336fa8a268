"""The part every DALI loader shares: epoch order over a shard directory, batch decoding through
:class:`ViewDecoder` with corrupt-sample handling, and the Loader protocol's epoch/state bookkeeping
(:class:`EpochLoader`, which the dense loaders share too).

Subclasses choose each sample's view (``views``) and turn decoded pixels into a Batch (``make_batch``).
An optional :class:`~itpn_ds.data.view_decoder.SampleAugment` draws each sample's parameters from
(seed, key, epoch) here and is applied by the decoder.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from itpn_ds.data.batch import Batch
from itpn_ds.data.sampler import DistributedOrder
from itpn_ds.data.shards import SampleChecksumError, ShardReader
from itpn_ds.data.torch_loader import PILViewDecoder
from itpn_ds.data.view_decoder import SampleAugment, ViewDecoder, ViewOutput
from itpn_ds.data.views import CropView
from itpn_ds.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("dali", "torch")  # torch: PIL decoding (itpn_ds.data.torch_loader), same order/views/state
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The student's input normalization, by name (data.normalize): timm's ImageNet default, the Inception 0.5/0.5
# that iTPN's CLIP scripts use (no --imagenet_default_mean_and_std), and CLIP's own statistics.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


class CorruptSampleError(UserError, RuntimeError):
    """A sample whose JPEG DALI cannot decode, met with ``on_corrupt='raise'``."""


def student_output(img_size: int, normalize: str = "imagenet") -> ViewOutput:
    """The network's input: bicubic to ``img_size``, normalized inside the decoder by the ``normalize``
    statistics (a key of ``NORMALIZATIONS``)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got {normalize!r}")
    return ViewOutput(img_size, "cubic", *NORMALIZATIONS[normalize])


class EpochLoader:
    """The Loader protocol over a shard directory (or the subset ``samples`` of its sample indices): this rank's
    share of each epoch (``DistributedOrder``), a background thread decoding the next batch, and ``state_dict`` =
    the global epoch position.
    Subclasses turn one step's sample indices into a batch (``_load``)."""

    def __init__(self, shards: str | Path, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, samples: np.ndarray | None = None) -> None:
        self.reader = ShardReader(shards)
        self.manifest = self.reader.manifest
        self.samples = np.arange(len(self.reader)) if samples is None else np.asarray(samples, dtype=np.int64)
        self.order = DistributedOrder(len(self.samples), micro_batch, rank, world_size, seed)
        self.seed = seed
        self.epoch = 0
        self.offset = 0

    # --- Loader protocol
    def __len__(self) -> int:
        return self.order.steps(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.offset = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has {self.seed}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def __iter__(self) -> Iterator:
        """The rest of the epoch. The next batch is decoded in a background thread while the caller uses
        the current one; ``offset`` advances only when a batch is handed out, so ``state_dict`` taken
        between batches resumes exactly after the last batch the caller received."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-loader") as prefetch:
            pending = None
            for step in self.order(self.epoch, self.offset):
                ahead = (prefetch.submit(self._load, self.samples[step.indices], step.valid), step.next_offset)
                if pending is not None:
                    yield self._hand_out(*pending)
                pending = ahead
            if pending is not None:
                yield self._hand_out(*pending)
        self.offset = 0
        self.epoch += 1

    def _hand_out(self, future: Future, next_offset: int):
        batch = future.result()
        self.offset = next_offset
        return batch

    def _load(self, indices: np.ndarray, valid: np.ndarray):
        """One step's batch: global sample indices (B,) and their validity (B,)."""
        raise NotImplementedError


class FixedPass:
    """Mixed in before an ``EpochLoader`` subclass by the evaluation loaders: every iteration is one whole
    pass in the epoch-0 order, whatever epoch the caller sets."""

    def set_epoch(self, epoch: int) -> None:
        self.offset = 0

    def __iter__(self):
        self.epoch = 0
        yield from super().__iter__()
        self.epoch = 0


class ShardLoader(EpochLoader):
    """Iterates this rank's share of an epoch through a view decoder; ``state_dict`` is the global epoch
    position.

    backend:    ``dali`` (ViewDecoder) or ``torch`` (PILViewDecoder, for machines without DALI).
    on_corrupt: ``skip`` (the sample becomes a zero image with valid=False, counted in
                ``corrupt_count`` and logged with its key) or ``raise``.
    torch_resize: DALI backend on the CPU: cubic/linear outputs resized by torch (default) or by DALI.
    color_jitter: the decoder applies the views' colour-jitter factors (the subclass's views carry them).
    decode:     DALI backend: ``roi`` (decode only the view's box) or ``full`` (decode the image, then crop);
                the torch backend always decodes the whole image.
    """

    def __init__(self, shards: str | Path, decoder_outputs: list[ViewOutput], micro_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2, device: str = "auto",
                 on_corrupt: str = "skip", augment: SampleAugment | None = None, backend: str = "dali",
                 torch_resize: bool = True, color_jitter: bool = False, decode: str = "roi",
                 samples: np.ndarray | None = None) -> None:
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(shards, micro_batch, rank, world_size, seed, samples)
        self.backend = backend
        decoder_cls = ViewDecoder if backend == "dali" else PILViewDecoder
        self.decoder = decoder_cls(decoder_outputs, device=device, batch_size=micro_batch, num_threads=num_threads,
                                   augment=augment, torch_resize=torch_resize, color_jitter=color_jitter,
                                   decode=decode)
        self.augment = augment
        self.on_corrupt = on_corrupt
        self.corrupt_count = 0

    # --- for subclasses
    def views(self, keys: list[str], sizes: list[tuple[int, int]], indices: np.ndarray) -> tuple[list[int], list[CropView]]:
        raise NotImplementedError

    def make_batch(self, keys: list[str], indices: np.ndarray, view_ids: list[int], outputs: list[torch.Tensor],
                   valid: torch.Tensor) -> Batch:
        raise NotImplementedError

    # --- internals
    def _load(self, indices: np.ndarray, valid: np.ndarray) -> Batch:
        m = self.manifest
        keys = [m.keys[i] for i in indices]
        view_ids, views = self.views(keys, [m.sizes[i] for i in indices], indices)
        params = None if self.augment is None else [self.augment.draw(self.seed, k, self.epoch) for k in keys]
        valid_t = torch.from_numpy(valid.copy())
        encoded = [self._read(int(i), k, valid_t, j) for j, (i, k) in enumerate(zip(indices, keys))]
        outputs = self._decode(encoded, views, params, keys, valid_t)
        return self.make_batch(keys, indices, view_ids, outputs, valid_t)

    def _read(self, index: int, key: str, valid: torch.Tensor, position: int) -> bytes | None:
        """The sample's JPEG, or None when its bytes are not those written (``on_corrupt`` applies)."""
        try:
            return self.reader.encoded(index)
        except SampleChecksumError as exc:
            self._corrupt(position, key, str(exc), valid)
            return None

    def _corrupt(self, position: int, key: str, reason: str, valid: torch.Tensor) -> None:
        """``on_corrupt``: raise, or mark the batch position invalid, count it and log the key and why."""
        if self.on_corrupt == "raise":
            raise CorruptSampleError(f"sample {key!r}: {reason} (data.on_corrupt=raise; =skip counts and skips it)")
        self.corrupt_count += 1
        log.warning("skipping corrupt sample %r (%d so far): %s", key, self.corrupt_count, reason)
        valid[position] = False

    def _decode(self, encoded: list[bytes | None], views: list[CropView], params: list[np.ndarray] | None,
                keys: list[str], valid: torch.Tensor) -> list[torch.Tensor]:
        """Decode the batch; samples already found corrupt (None) or failing to decode (found by decoding
        sample by sample after the batch failed) become zero images with valid=False."""
        if all(data is not None for data in encoded):
            try:
                return self.decoder.decode(encoded, views, params)
            except RuntimeError:
                pass
        per_sample: list[list[torch.Tensor] | None] = []
        for i, (data, view) in enumerate(zip(encoded, views)):
            decoded = None
            if data is not None:
                try:
                    decoded = self.decoder.decode([data], [view], None if params is None else [params[i]])
                except RuntimeError as exc:
                    self._corrupt(i, keys[i], f"cannot be decoded: {exc}", valid)
            per_sample.append(decoded)
        shapes = [o.shape[1:] for o in self.decoder_template()]
        return [torch.cat([s[k] if s is not None else torch.zeros(1, *shapes[k]) for s in per_sample])
                for k in range(len(shapes))]

    def decoder_template(self) -> list[torch.Tensor]:
        """One zero (1, 3, S, S) tensor per decoder output."""
        return [torch.zeros(1, 3, o.size, o.size) for o in self.decoder.outputs]
