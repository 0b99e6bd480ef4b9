"""A dfkd `.wds` store is a plain WebDataset: webdataset.WebDataset and its standard decoders read what dfkd reads."""

import glob
import os

import numpy as np
import pytest
import webdataset as wds

from dfkd import store
from tests.helpers import fill, small_meta


@pytest.mark.parametrize("channels,image_format,decoder", [(3, "png", "rgb8"), (1, "png", "l8"), (3, "npy", "rgb8")])
def test_webdataset_reads_the_same_samples_as_dfkd(tmp_path, channels, image_format, decoder):
    path = str(tmp_path / "s.wds")
    meta = small_meta(num_samples=50, unit_size=16, image_shape=(channels, 8, 8))
    writer = store.create(path, meta, image_format=image_format)
    fill(writer)
    writer.finalize()
    ours = store.open(path).read(0, meta.num_samples)

    shards = sorted(glob.glob(os.path.join(path, "*.tar")))
    assert len(shards) == meta.num_units
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode(decoder))
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(meta.num_samples)]
    image_key = image_format
    images = np.stack([s[image_key] for s in samples])
    if image_format == "png":  # PIL gives H x W (x C); the store is C x H x W
        images = images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(images, ours.images)
    logits = np.stack([s["logits.npy"] for s in samples])
    assert logits.dtype == ours.logits.dtype and np.array_equal(logits, ours.logits)
    np.testing.assert_array_equal([s["cls"] for s in samples], ours.labels)
    assert [s["json"]["index"] for s in samples] == list(range(meta.num_samples))
