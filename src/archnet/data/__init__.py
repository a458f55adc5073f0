"""Image data for distillation and evaluation: named datasets, image folders, tensor files.

Distillation only needs unlabeled images at the teacher's input size; labels, when present,
are kept so students can be scored against ground truth as well as against the teacher.
A spec is a dataset name (`fashion-mnist`, `fashion-mnist:DIR`, `digits`) or a path.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from archnet.errors import ArchnetError

from .datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    Dataset,
    digits,
    fashion_mnist,
    fashion_mnist_missing,
    get_dataset,
    list_datasets,
    parse_dataset,
    register_dataset,
)
from .files import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, TENSOR_EXTENSIONS, load_images
from .idx import read_idx
from .imagedata import ImageData, Size, batches, check_finite, height_width

__all__ = [
    "Size",
    "height_width",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "TENSOR_EXTENSIONS",
    "Dataset",
    "ImageData",
    "batches",
    "check_finite",
    "digits",
    "fashion_mnist",
    "fashion_mnist_missing",
    "get_dataset",
    "list_datasets",
    "load_data",
    "load_images",
    "native_input_size",
    "parse_dataset",
    "read_idx",
    "register_dataset",
    "test_split",
]

SPLITS = ("train", "test")


def _named(spec: str | Path) -> tuple[Dataset, Path | None] | None:
    """The dataset a spec names; a `Path` is always a path, never a name."""
    return None if isinstance(spec, Path) else parse_dataset(str(spec))


def _not_a_name(spec: str | Path) -> None:
    """A missing path that looks like a misspelt dataset name gets a 'did you mean'."""
    text = str(spec).strip()
    if isinstance(spec, Path) or Path(text).expanduser().exists():
        return
    guess = difflib.get_close_matches(text.partition(":")[0].lower(), list_datasets(), n=1)
    if guess:
        raise ArchnetError(
            f"data {text!r} is neither a path nor a dataset; did you mean '{guess[0]}'? "
            f"(datasets: {', '.join(list_datasets())})"
        )


def load_data(
    spec: str | Path,
    size: Size,
    channels: int = 3,
    split: str = "train",
    shape: tuple[int, ...] | None = None,
) -> ImageData:
    """Load a dataset's split, or the data at a path, at (channels, H, W) (``size``: a side or
    (H, W)); a tensor file may hold inputs of any ``shape`` (default: (channels, H, W)).

    Every source is checked for NaN and infinity here, so bad data fails at load and not at
    the ONNX check at the end of a run.
    """
    if split not in SPLITS:
        raise ArchnetError(f"split {split!r} is unknown; use one of: {', '.join(SPLITS)}")
    named = _named(spec)
    if named is not None:
        dataset, root = named
        data = dataset.load(split, size, channels, root)
    elif split != "train":
        raise ArchnetError(
            f"data {spec} is a path and has no {split} split; only datasets "
            f"({', '.join(list_datasets())}) have one, so pass your {split} images as --eval-data"
        )
    else:
        _not_a_name(spec)
        data = load_images(spec, size=size, channels=channels, shape=shape)
    check_finite(data.images, data.source)
    return data


def test_split(spec: str | Path, size: Size, channels: int = 3) -> ImageData | None:
    """The named dataset's official test split; None for paths and sets without one (digits)."""
    named = _named(spec)
    if named is None or "test" not in named[0].splits:
        return None
    return load_data(spec, size, channels, split="test")


def native_input_size(spec: str | Path) -> tuple[int, int, int] | None:
    """The (C, H, W) a named dataset is made for; None for paths (their size is the model's)."""
    named = _named(spec)
    return None if named is None else named[0].native_shape


test_split.__test__ = False  # named like a test: keep pytest from collecting it where imported
