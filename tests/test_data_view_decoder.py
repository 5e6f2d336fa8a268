"""ViewDecoder decodes exactly the view's box: the same pixels PIL gets by crop + flip + resize."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from itpn_ds.data.augment import RandAugment
from itpn_ds.data.shards import ShardReader
from itpn_ds.data.view_decoder import ViewDecoder
from itpn_ds.data.views import CropView, sample_view


def _pil_view(data: bytes, view: CropView, size: int, resample) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB").crop((view.x, view.y, view.x + view.w, view.y + view.h))
    if view.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image.resize((size, size), resample), dtype=np.float32) / 255.0


def test_views_match_pil_crop_flip_resize_for_every_output(demo_shards):
    reader = ShardReader(demo_shards)
    samples = [reader.sample(i) for i in range(6)]
    views = [sample_view(3, s.key, 0, *s.size) for s in samples]
    views[0] = CropView(5, 7, 40, 30, True)
    decoder = ViewDecoder([(64, "cubic"), (56, "lanczos")], device="cpu", batch_size=8, num_threads=1)
    student, teacher = decoder.decode([s.data for s in samples], views)
    assert student.shape == (6, 3, 64, 64) and teacher.shape == (6, 3, 56, 56)
    assert student.dtype == teacher.dtype == np.float32 or str(student.dtype) == "torch.float32"
    for i, (sample, view) in enumerate(zip(samples, views)):
        ref = _pil_view(sample.data, view, 64, Image.Resampling.BICUBIC)
        assert np.abs(student[i].permute(1, 2, 0).numpy() - ref).mean() < 0.01, sample.key
    flipped = decoder.decode([samples[0].data], [CropView(5, 7, 40, 30, False)])[0]
    assert np.allclose(flipped[0].flip(-1).numpy(), student[0].numpy(), atol=1e-6)


def test_batch_larger_than_configured_is_rejected(demo_shards):
    reader = ShardReader(demo_shards)
    decoder = ViewDecoder([(32, "linear")], device="cpu", batch_size=2, num_threads=1)
    with pytest.raises(ValueError, match="decoder takes 1..2"):
        decoder.decode([reader.encoded(i) for i in range(3)], [CropView(0, 0, 10, 10, False)] * 3)


def test_outputs_stay_valid_after_later_decodes(demo_shards):
    """CPU outputs are zero-copy views of DALI's buffers: later batches must not write into them."""
    reader = ShardReader(demo_shards)
    samples = [reader.sample(i) for i in range(12)]
    views = [sample_view(0, s.key, 0, *s.size) for s in samples]
    decoder = ViewDecoder([(32, "cubic"), (24, "lanczos")], device="cpu", batch_size=4, num_threads=1)
    first = decoder.decode([s.data for s in samples[:4]], views[:4])
    kept = [t.clone() for t in first]
    for start in (4, 8):
        decoder.decode([s.data for s in samples[start:start + 4]], views[start:start + 4])
    assert all(t.equal(k) for t, k in zip(first, kept))


def test_single_dali_graph_agrees_with_the_torch_resize_path(demo_shards):
    """torch_resize=False runs the GPU's single graph (DALI resizes everything) on the CPU: the same
    lanczos pixels bitwise, cubic pixels within resize rounding, with the same keyed RandAugment."""
    reader = ShardReader(demo_shards)
    samples = [reader.sample(i) for i in range(8)]
    views = [sample_view(0, s.key, 0, *s.size) for s in samples]
    augment = RandAugment(num_ops=2, magnitude=9)
    params = [augment.draw(0, s.key, 1) for s in samples]
    outputs = [(48, "cubic"), (40, "lanczos")]
    split, single = (ViewDecoder(outputs, device="cpu", batch_size=8, num_threads=1, augment=augment, torch_resize=t)
                     .decode([s.data for s in samples], views, params) for t in (True, False))
    assert torch.equal(split[1], single[1])
    assert (split[0] - single[0]).abs().mean() < 0.01


@pytest.mark.parametrize("torch_resize", [True, False])
def test_full_decode_then_crop_gives_the_roi_decoders_pixels(demo_shards, torch_resize):
    """data.decode=full (whole image, then slice the box) against roi (image_slice): the same pixels, for
    sampled boxes, a box at the image's corner, a one-pixel-wide box and a whole-image box, with jitter."""
    reader = ShardReader(demo_shards)
    samples = [reader.sample(i) for i in range(5)]
    views = [sample_view(1, s.key, 0, *s.size, color_jitter=0.4) for s in samples]
    w, h = samples[0].size
    views[1:4] = [CropView(w - 17, h - 13, 17, 13, True), CropView(3, 0, 1, h, False), CropView(0, 0, w, h, False)]
    samples[1:4] = [samples[0]] * 3
    outputs = [(40, "cubic"), (28, "lanczos")]
    roi, full = (ViewDecoder(outputs, device="cpu", batch_size=8, num_threads=1, torch_resize=torch_resize,
                             color_jitter=True, decode=mode).decode([s.data for s in samples], views)
                 for mode in ("roi", "full"))
    for a, b in zip(roi, full):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1 / 255 + 1e-6  # at most one uint8 level (libjpeg-turbo's ROI vs full IDCT)
        assert (a - b).abs().mean() < 1e-3


def test_unknown_decode_mode_is_refused():
    with pytest.raises(ValueError, match="decode must be one of roi, full|decode must be one of"):
        ViewDecoder([(32, "cubic")], device="cpu", decode="nvjpeg")


@pytest.mark.parametrize("torch_resize", [True, False])
def test_bad_jpegs_many_times_in_a_row_never_take_the_process_down(demo_shards, torch_resize):
    """A zeroed header is refused before DALI sees it; a damaged body fails in DALI, whose graphs are then
    rebuilt (a failed DALI pipeline is no longer valid, and running it again crashed the process)."""
    reader = ShardReader(demo_shards)
    good = [reader.sample(i) for i in range(2)]
    zeroed_header = bytes(8) + good[0].data[8:]
    damaged_body = good[0].data[:20] + bytes(len(good[0].data) - 20)
    view = CropView(0, 0, 16, 16, False)
    decoder = ViewDecoder([(16, "cubic"), (12, "lanczos")], device="cpu", batch_size=2, num_threads=1,
                          torch_resize=torch_resize)
    expected = decoder.decode([s.data for s in good], [view, view])
    for _ in range(6):
        for bad, message in ((zeroed_header, "not a JPEG"), (damaged_body, None)):
            with pytest.raises(RuntimeError, match=message):
                decoder.decode([good[1].data, bad], [view, view])
        again = decoder.decode([s.data for s in good], [view, view])
        assert all(a.equal(e) for a, e in zip(again, expected))
