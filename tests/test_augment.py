"""Crops and flips: every pixel equals the padded image's slice at the drawn offsets, mirrored where drawn."""

import pytest
import torch
import torch.nn.functional as F

from dfkd.store.toolbox.augment import augment, crop_flip


def reference(images, oy, ox, flip, pad):
    """The definition, one image at a time: pad with zeros, slice at (oy, ox), mirror the columns."""
    h, w = images.shape[2:]
    out = []
    for i, img in enumerate(F.pad(images, (pad, pad, pad, pad))):
        crop = img[:, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
        out.append(crop.flip(2) if flip is not None and flip[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape, pad", [((3, 8, 8), 1), ((1, 28, 28), 3), ((2, 6, 10), 2)])
def test_crop_flip_is_the_padded_slice_mirrored_where_drawn(dtype, shape, pad):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, *shape), generator=g).to(dtype)
    oy, ox = (torch.randint(0, 2 * pad + 1, (64,), generator=g) for _ in range(2))
    flip = torch.rand(64, generator=g) < 0.5
    for f in (flip, None):
        got = crop_flip(images, oy, ox, f, pad)
        assert got.dtype == dtype and torch.equal(got, reference(images, oy, ox, f, pad))


def test_every_offset_and_flip_is_drawn_and_the_whole_image_is_one_of_them():
    images = torch.arange(2000 * 16, dtype=torch.float32).view(2000, 1, 4, 4)
    out = augment(images, "flip-crop", torch.Generator().manual_seed(1), pad=1)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(3)).flatten(1).all(1)
    assert 0.02 < same.float().mean() < 0.1 and 0.02 < mirrored.float().mean() < 0.1  # each 1/18 of the draws
    assert torch.equal(augment(images, "none", torch.Generator()), images)
