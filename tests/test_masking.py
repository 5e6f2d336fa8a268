"""Block masks and random masking: counts, block shapes, determinism, any grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from itpn_ds.data.masking import BlockMaskGenerator, RandomMaskGenerator, mask_rng
from itpn_ds.models.pixel_mae import ids_from_mask


def test_block_masks_have_exact_count_and_are_blocky():
    generator = BlockMaskGenerator(14, 14, num_masked=75)
    masks = generator.batch(seed=0, epoch=0, indices=range(200))
    assert masks.shape == (200, 196) and masks.dtype == torch.bool
    assert (masks.sum(1) == 75).all()
    components = [ndimage.label(m.reshape(14, 14).numpy())[1] for m in masks]
    assert np.mean(components) < 8  # a few blocks, not 75 scattered patches
    positions = masks.float().mean(0)
    assert positions.min() > 0.02 and positions.max() < 0.85  # every patch, corners included, gets masked


def test_masks_depend_only_on_seed_epoch_and_index():
    generator = BlockMaskGenerator(14, 14)
    a = generator.batch(1, 2, [5, 9, 11])
    assert torch.equal(a[1:], generator.batch(1, 2, [9, 11]))
    assert not torch.equal(a, generator.batch(1, 3, [5, 9, 11]))
    assert not torch.equal(a, generator.batch(2, 2, [5, 9, 11]))


@pytest.mark.parametrize("height,width", [(1, 1), (2, 3), (4, 4), (7, 10), (16, 16)])
def test_any_grid_gets_a_proportional_count(height, width):
    generator = BlockMaskGenerator(height, width)
    mask = generator(mask_rng(0, 0, 0))
    assert mask.shape == (height, width)
    assert mask.sum() == round(height * width * 75 / 196) == generator.masked_count


def test_count_outside_grid_is_rejected():
    with pytest.raises(ValueError, match="num_masked 20 outside 0..16"):
        BlockMaskGenerator(4, 4, num_masked=20)


def test_random_masks_have_the_mae_count_and_give_the_models_ids():
    generator = RandomMaskGenerator(16, 0.75)
    mask = generator.batch(0, 0, [3, 4, 5])
    assert mask.shape == (3, 16) and (mask.sum(1) == 12).all()
    assert torch.equal(mask[1:], generator.batch(0, 0, [4, 5]))
    assert not torch.equal(mask, generator.batch(0, 1, [3, 4, 5]))
    ids_keep, ids_restore = ids_from_mask(mask)
    assert ids_keep.shape == (3, 4) and not mask.gather(1, ids_keep).any()
    x = torch.arange(16).expand(3, 16)
    shuffled = torch.cat([x.gather(1, ids_keep), x.gather(1, torch.argsort(ids_restore)[:, 4:])], dim=1)
    assert torch.equal(shuffled.gather(1, ids_restore), x)


def test_random_masks_of_uneven_counts_are_refused_by_the_model():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        ids_from_mask(mask)
