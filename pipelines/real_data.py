"""Real-data adapters: each gives train/test splits as uint8 N×C×H×W tensors, labels, mean/std and shape.

Used for evaluation, teacher training, classical KD and statistics recording; never by the synthesis
or distillation stages directly (they receive tensors). Data are loaded from disk, from a package
(scikit-learn's digits, Debian's dataset-fashion-mnist), or downloaded by torchvision on first use.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..store.toolbox import fs
from ..store.toolbox.errors import DfkdError

DEFAULT_ROOT = os.environ.get("DFKD_DATA", os.path.join(os.path.expanduser("~"), ".cache", "dfkd", "data"))
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DataError(DfkdError):
    """Unknown dataset name, or data that cannot be found or read."""


@dataclass
class RealData:
    """A labelled dataset held in memory as uint8 pixels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # the label-preserving augmentation that suits the data: "crop", "flip-crop" or "none"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(round(v, 4) for v in x.mean(1).tolist()), tuple(round(v, 4) for v in x.std(1).tolist())


def _make(name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, k: int,
          augment: str) -> RealData:
    tr = torch.from_numpy(np.ascontiguousarray(xtr))
    mean, std = _stats(tr)
    return RealData(name, tr, torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(np.ascontiguousarray(xte)),
                    torch.from_numpy(yte.astype(np.int64)), k, mean, std, augment)


def digits(root: str) -> RealData:
    """scikit-learn's 8×8 digits (1797 images, shipped with the package): a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    return _make("digits", xtr, ytr, xte, yte, 10, "crop")


def _mnist_like(cls_name: str, root: str, name: str, augment: str) -> RealData:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    if cls_name == "FashionMNIST":
        _unpack_debian_fashion_mnist(root)
    try:
        tr, te = (cls(root, train=t, download=True) for t in (True, False))
    except Exception as exc:
        raise DataError(f"cannot load {name} under {root} ({type(exc).__name__}: {exc}); put the idx files in "
                        f"{root}/{cls_name}/raw/, or let torchvision download them") from None
    return _make(name, tr.data.numpy()[:, None], tr.targets.numpy(), te.data.numpy()[:, None],
                 te.targets.numpy(), 10, augment)


def _unpack_debian_fashion_mnist(root: str) -> None:
    """Use Debian's dataset-fashion-mnist package when installed: unpack its idx.gz files for torchvision."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if all(os.path.exists(os.path.join(raw, n)) for n in names):
        return
    if not all(os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, n + ".gz")) for n in names):
        return
    for n in names:  # 55 MB in all: each file decompressed in memory and written whole
        with gzip.open(os.path.join(DEBIAN_FASHION_MNIST, n + ".gz")) as src:
            fs.write_atomic(os.path.join(raw, n), src.read())


def fashion_mnist(root: str) -> RealData:
    """Fashion-MNIST, official 60k/10k split."""
    return _mnist_like("FashionMNIST", root, "fashion-mnist", "flip-crop")


def mnist(root: str) -> RealData:
    """MNIST, official 60k/10k split."""
    return _mnist_like("MNIST", root, "mnist", "crop")


def _cifar(cls_name: str, name: str, k: int, root: str) -> RealData:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        tr, te = (cls(root, train=t, download=True) for t in (True, False))
    except Exception as exc:
        raise DataError(f"cannot load {name} under {root} ({type(exc).__name__}: {exc}); let torchvision "
                        "download it once, or copy it there") from None
    chw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    return _make(name, chw(tr.data), np.array(tr.targets), chw(te.data), np.array(te.targets), k, "flip-crop")


# A folder's default augmentation: a shift of at most an eighth of the side never makes one class another; a
# mirror can (digits, letters, arrows), so flips are the user's choice (train-teacher --augment flip-crop).
FOLDER_AUGMENT = "crop"


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _folder_pixels(paths: list[str]) -> np.ndarray:
    """N×C×H×W uint8 of image files as they are: one channel when every image is gray (a gray PNG, or a colour
    file whose channels are equal everywhere), else RGB; the teacher, the store and the students then do the
    work of the real channels, and inversion invents no colour the data never had. One file open at a time."""
    from PIL import Image

    rgb, all_gray_modes = [], True
    for p in paths:  # torchvision's ImageFolder loader would make every image RGB
        try:
            with Image.open(p) as img:
                all_gray_modes &= img.mode in GRAY_MODES
                rgb.append(np.asarray(img.convert("RGB")))
        except OSError as e:  # not an image, truncated, unreadable
            raise DataError(f"cannot read {p} as an image ({e}); remove or replace it") from None
    if len({i.shape for i in rgb}) != 1:
        raise DataError("images differ in size; resize them to one size first")
    x = np.stack(rgb).transpose(0, 3, 1, 2)
    gray = all_gray_modes or bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())
    return np.ascontiguousarray(x[:, :1]) if gray else x


def _refuse_folder_loops(root: str) -> None:
    """Refuse a folder reached twice through links (one leading back up, or two class folders onto one): torchvision
    walks a dataset following links, so two links to `..` made it walk forever, and a link into another class's
    folder gave that class's images a second label."""
    seen: dict[str, str] = {}
    for folder, _, _ in os.walk(root, followlinks=True):  # top-down: a folder is seen before anything under it
        real = os.path.realpath(folder)
        if real in seen:
            raise DataError(f"{folder} is {seen[real]} again, through a link: a dataset folder must not reach a "
                            "folder twice (a link loop, or two classes sharing images); remove the link")
        seen[real] = folder


def image_folder(path: str) -> RealData:
    """An ImageFolder tree with train/ and test/ (or val/) subfolders of class folders; images of one size.
    Gray images stay one channel; the default augmentation is FOLDER_AUGMENT."""
    import torchvision

    split = lambda names: next((os.path.join(path, n) for n in names if os.path.isdir(os.path.join(path, n))), None)
    tr_dir, te_dir = split(["train"]), split(["test", "val"])
    if tr_dir is None or te_dir is None:
        raise DataError(f"{path} needs train/ and test/ (or val/) subfolders, each with one folder per class")

    def listing(d: str) -> tuple[list[str], np.ndarray, list[str]]:
        _refuse_folder_loops(d)
        try:
            ds = torchvision.datasets.ImageFolder(d)  # the class folders and the files in them; nothing decoded
        except (FileNotFoundError, RuntimeError):  # torchvision's words for no class folders or no image files
            raise DataError(f"{d} holds no images in class folders; put each class's images in a folder of its "
                            "own (train/cat/1.png, train/dog/2.png, ...)") from None
        return [p for p, _ in ds.samples], np.array([y for _, y in ds.samples]), ds.classes

    tr, ytr, classes = listing(tr_dir)
    te, yte, classes_te = listing(te_dir)
    if classes != classes_te:
        raise DataError(f"{path}: train and test class folders differ")
    try:
        x = _folder_pixels(tr + te)  # one decision for both splits: the teacher sees test images as it trained
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return _make(f"folder:{path}", x[:len(tr)], ytr, x[len(tr):], yte, len(classes), FOLDER_AUGMENT)


DATASETS: dict[str, Callable[[str], RealData]] = {
    "digits": digits, "fashion-mnist": fashion_mnist, "mnist": mnist,
    "cifar10": lambda root: _cifar("CIFAR10", "cifar10", 10, root),
    "cifar100": lambda root: _cifar("CIFAR100", "cifar100", 100, root),
}


def load_data(name: str, root: str | None = None) -> RealData:
    """A dataset by name (digits, fashion-mnist, mnist, cifar10, cifar100) or an ImageFolder path."""
    if name in DATASETS:
        return DATASETS[name](root or DEFAULT_ROOT)
    if os.path.isdir(name):
        return image_folder(name)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or give an ImageFolder path")
