"""Named datasets, so `--data NAME` and `--data NAME:DIR` resolve through a registry.

`digits` ships inside scikit-learn (smoke tests run with no download); `fashion-mnist` is the
benchmark and demo task, read from the IDX files that the Debian/Ubuntu package
`dataset-fashion-mnist` installs, or from a folder the user downloaded them into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from archnet.errors import ArchnetError

from .idx import read_idx
from .imagedata import ImageData, Size, height_width

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "Dataset",
    "digits",
    "fashion_mnist",
    "fashion_mnist_missing",
    "get_dataset",
    "list_datasets",
    "parse_dataset",
    "register_dataset",
]

#: (split, size, channels, root or None for the dataset's own location) -> ImageData
Loader = Callable[[str, int, int, Path | None], ImageData]


@dataclass(frozen=True)
class Dataset:
    """A named dataset: its loader, the splits it has and the input shape it is made for."""

    name: str
    loader: Loader
    native_shape: tuple[int, int, int]
    splits: tuple[str, ...] = ("train", "test")
    takes_root: bool = True

    def load(self, split: str, size: int, channels: int, root: Path | None = None) -> ImageData:
        if split not in self.splits:
            raise ArchnetError(
                f"{self.name} has no {split} split (only {', '.join(self.splits)}); evaluate on "
                "a held-out share of it (the default) or pass --eval-data"
            )
        if root is not None and not self.takes_root:
            raise ArchnetError(f"{self.name} is built in and takes no folder; pass '{self.name}'")
        return self.loader(split, size, channels, root)


_DATASETS: dict[str, Dataset] = {}


def register_dataset(
    name: str,
    native_shape: tuple[int, int, int],
    splits: tuple[str, ...] = ("train", "test"),
    takes_root: bool = True,
) -> Callable[[Loader], Loader]:
    """Decorator: make `loader` reachable as `--data NAME` (and `NAME:DIR` if `takes_root`)."""

    def deco(loader: Loader) -> Loader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = Dataset(name, loader, native_shape, splits, takes_root)
        return loader

    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset(name: str) -> Dataset | None:
    return _DATASETS.get(name.strip().lower())


def parse_dataset(spec: str) -> tuple[Dataset, Path | None] | None:
    """'NAME' or 'NAME:DIR' -> (dataset, DIR or None); None when `spec` names no dataset."""
    name, sep, root = spec.strip().partition(":")
    dataset = get_dataset(name)
    if dataset is None:
        return None
    if sep and not root.strip():
        raise ArchnetError(
            f"--data {spec!r} has no folder after ':'; pass '{name}:DIR' or '{name}'"
        )
    return dataset, (Path(root.strip()).expanduser() if sep else None)


# --- digits ----------------------------------------------------------------------------------
def digits(size: Size = 32, channels: int = 3) -> ImageData:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled and normalized to [-1, 1].

    The set ships inside scikit-learn, so demos and tests run without any download.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1) / 16.0
    if height_width(size) != (8, 8):
        x = F.interpolate(x, size=height_width(size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).repeat(1, channels, 1, 1)
    x = (x - 0.5) / 0.5
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return ImageData(
        images=x.contiguous(),
        labels=labels,
        classes=[str(i) for i in range(10)],
        source="digits",
    )


@register_dataset("digits", native_shape=(3, 32, 32), splits=("train",), takes_root=False)
def _digits(split: str, size: int, channels: int, root: Path | None) -> ImageData:
    return digits(size=size, channels=channels)


# --- Fashion-MNIST ---------------------------------------------------------------------------
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
#: Mean and std of the training pixels in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_SIDE = 28


def _find(root: Path, stem: str) -> Path | None:
    return next((p for p in (root / f"{stem}.gz", root / stem) if p.is_file()), None)


def fashion_mnist_missing(root: Path | None = None) -> str | None:
    """The one-line 'how to get them' message when any of the four files is missing, else None."""
    where = FASHION_MNIST_DIR if root is None else Path(root)
    stems = [stem for pair in FASHION_MNIST_FILES.values() for stem in pair]
    missing = [s for s in stems if _find(where, s) is None]
    if not missing:
        return None
    pkg, url = FASHION_MNIST_PACKAGE, FASHION_MNIST_URL
    if root is None:
        return (
            f"Fashion-MNIST is not installed ({where} lacks {missing[0]}.gz); install the "
            f"Debian/Ubuntu package {pkg} (sudo apt-get install {pkg}), or download the four "
            f"*-ubyte.gz files from {url} (folder data/fashion) into a folder DIR and pass "
            "--data fashion-mnist:DIR"
        )
    what = "does not exist" if not where.is_dir() else f"lacks {', '.join(missing)} (.gz or plain)"
    return (
        f"fashion-mnist:{where}: the folder {what}; download the four *-ubyte.gz files from "
        f"{url} (folder data/fashion) into it, or install the Debian/Ubuntu package {pkg} and "
        "pass --data fashion-mnist"
    )


def _pixels(images: np.ndarray, size: Size, channels: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalized float32 (N, channels, H, W).

    32 is reached by zero-padding (the background is 0, and 32 keeps every stride-2 stage even);
    any other size is a bilinear resize, antialiased when shrinking.
    """
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
    h, w = height_width(size)
    if (h, w) == (_SIDE + 4, _SIDE + 4):
        x = F.pad(x, (2, 2, 2, 2))
    elif (h, w) != (_SIDE, _SIDE):
        shrink = min(h, w) < _SIDE
        x = F.interpolate(
            x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink
        ).clamp_(0.0, 1.0)
    x = x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x.repeat(1, channels, 1, 1) if channels != 1 else x


def _read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's images and labels, with what Fashion-MNIST promises checked."""
    image_file, label_file = (_find(root, stem) for stem in FASHION_MNIST_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (_SIDE, _SIDE):
        raise ArchnetError(
            f"{image_file} holds {images.dtype} of shape {images.shape}, not 28x28 uint8 images; "
            "replace it with the Fashion-MNIST file of that name"
        )
    if labels.ndim != 1 or len(labels) != len(images) or (labels.size and labels.max() > 9):
        raise ArchnetError(
            f"{label_file} holds labels of shape {labels.shape} (max {labels.max(initial=0)}) for "
            f"{len(images)} images; replace it with the Fashion-MNIST file of that name"
        )
    return images, labels


def fashion_mnist(
    split: str = "train", size: Size = 32, channels: int = 1, root: str | Path | None = None
) -> ImageData:
    """Fashion-MNIST's 60,000 train or 10,000 test images with their ten class labels."""
    missing = fashion_mnist_missing(None if root is None else Path(root))
    if missing:
        raise ArchnetError(missing)
    where = FASHION_MNIST_DIR if root is None else Path(root)
    images, labels = _read_split(where, split)
    name = "fashion-mnist" if root is None else f"fashion-mnist:{where}"
    return ImageData(
        images=_pixels(images, size, channels),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES),
        source=f"{name}[{split}]",
    )


@register_dataset("fashion-mnist", native_shape=(1, _SIDE + 4, _SIDE + 4))
def _fashion_mnist(split: str, size: int, channels: int, root: Path | None) -> ImageData:
    return fashion_mnist(split=split, size=size, channels=channels, root=root)
