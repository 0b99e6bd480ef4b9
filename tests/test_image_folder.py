"""ImageFolder trees as real data: the channels the files have, a default augmentation that keeps labels."""

import numpy as np
import pytest
from PIL import Image

from dfkd.pipelines.real_data import DataError, FOLDER_AUGMENT, load_data


def _tree(root, make, classes=("a", "b"), per_class=3):
    """train/ and test/ with `per_class` images of each class; make(class index, i) gives a PIL image."""
    for split in ("train", "test"):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                make(k, i).save(d / f"{i}.png")
    return str(root)


def _pixels(k, i, channels):
    rng = np.random.default_rng(10 * k + i)
    return rng.integers(0, 256, (6, 5, channels) if channels > 1 else (6, 5), dtype=np.uint8)


def test_a_folder_of_gray_pngs_stays_one_channel_with_its_pixels(tmp_path):
    path = _tree(tmp_path, lambda k, i: Image.fromarray(_pixels(k, i, 1), mode="L"))
    real = load_data(path)
    assert real.image_shape == (1, 6, 5) and real.num_classes == 2 and len(real.train_images) == 6
    assert np.array_equal(real.train_images[0, 0].numpy(), _pixels(0, 0, 1))  # class a, file 0.png
    assert len(real.mean) == 1 and real.augment == FOLDER_AUGMENT == "crop"  # a mirror can change a label


def test_colour_files_keep_three_channels_and_gray_rgb_files_become_one(tmp_path):
    colour = load_data(_tree(tmp_path / "c", lambda k, i: Image.fromarray(_pixels(k, i, 3), mode="RGB")))
    assert colour.image_shape == (3, 6, 5)
    assert np.array_equal(colour.test_images[3].numpy().transpose(1, 2, 0), _pixels(1, 0, 3))
    gray_rgb = lambda k, i: Image.fromarray(np.repeat(_pixels(k, i, 1)[..., None], 3, 2), mode="RGB")
    assert load_data(_tree(tmp_path / "g", gray_rgb)).image_shape == (1, 6, 5)


def test_a_folder_mixing_gray_and_colour_is_rgb_and_sizes_must_agree(tmp_path):
    mixed = lambda k, i: (Image.fromarray(_pixels(k, i, 3), mode="RGB") if k else
                          Image.fromarray(_pixels(k, i, 1), mode="L"))
    real = load_data(_tree(tmp_path / "m", mixed))
    assert real.image_shape == (3, 6, 5)
    assert np.array_equal(real.train_images[0].numpy(), np.repeat(_pixels(0, 0, 1)[None], 3, 0))
    sizes = lambda k, i: Image.fromarray(np.zeros((6 + i, 5), np.uint8), mode="L")
    with pytest.raises(DataError, match="images differ in size; resize them"):
        load_data(_tree(tmp_path / "s", sizes))


def test_a_file_that_is_no_image_is_named_in_one_line(tmp_path):
    path = _tree(tmp_path, lambda k, i: Image.fromarray(_pixels(k, i, 1), mode="L"))
    (tmp_path / "train" / "a" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read .*9.png as an image .*; remove or replace it"):
        load_data(path)


def test_link_loops_and_shared_class_folders_are_refused_in_one_line_and_outside_links_work(tmp_path):
    """Two links to `..` in a class folder made torchvision's walk run forever (a hang in train-teacher, record,
    distill --kd-data/--eval); a link into another class's folder gave its images a second label."""
    import os
    import subprocess
    import sys

    gray = lambda k, i: Image.fromarray(_pixels(k, i, 1), mode="L")
    loop = _tree(tmp_path / "loop", gray)
    os.symlink("..", os.path.join(loop, "train", "a", "up"))
    os.symlink("..", os.path.join(loop, "train", "a", "up2"))
    code = ("import sys\nfrom dfkd.pipelines.real_data import DataError, load_data\n"
            "try:\n    load_data(sys.argv[1])\nexcept DataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, loop], capture_output=True, text=True, timeout=120).stdout
    assert "is " in out and "again, through a link" in out and out.count("\n") == 1, out
    shared = _tree(tmp_path / "shared", gray)
    os.symlink(os.path.join(shared, "train", "b"), os.path.join(shared, "train", "a", "more"))
    with pytest.raises(DataError, match="again, through a link"):
        load_data(shared)
    outside = _tree(tmp_path / "outside", gray)  # a class folder that is a link to images kept elsewhere: fine
    os.rename(os.path.join(outside, "train", "b"), str(tmp_path / "kept-b"))
    os.symlink(str(tmp_path / "kept-b"), os.path.join(outside, "train", "b"))
    assert len(load_data(outside).train_images) == 6
