"""Image data for distillation and evaluation: the built-in digits set, image folders, tensors.

Distillation only needs unlabeled images at the teacher's input size; labels, when present,
are kept so students can be scored against ground truth as well as against the teacher.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from archnet.errors import ArchnetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageData",
    "batches",
    "digits",
    "load_data",
    "load_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TENSOR_EXTENSIONS = (".pt", ".pth", ".npy")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageData:
    """A batch of normalized images, with optional integer labels and class names."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image (C, H, W), as a model's input without the batch dimension."""
        return tuple(self.images.shape[1:])

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def _take(self, index: torch.Tensor, tag: str) -> ImageData:
        return ImageData(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            classes=self.classes,
            source=f"{self.source}[{tag}]",
        )

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageData, ImageData]:
        """Shuffle with `seed` and cut into (first `fraction`, rest); same seed, same split."""
        if not 0.0 < fraction < 1.0:
            raise ArchnetError(f"split fraction {fraction} is outside (0, 1); pass e.g. 0.8")
        n = len(self)
        n_first = min(max(int(round(n * fraction)), 1), n - 1) if n > 1 else n
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self._take(perm[:n_first], "split-a"), self._take(perm[n_first:], "split-b")

    def subset(self, n: int) -> ImageData:
        """The first `n` images (all of them when `n` exceeds the size)."""
        n = min(max(int(n), 0), len(self))
        return self._take(torch.arange(n), f":{n}")


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    c = x.shape[1]
    m = torch.tensor((mean * c)[:c], dtype=x.dtype).view(1, c, 1, 1)
    s = torch.tensor((std * c)[:c], dtype=x.dtype).view(1, c, 1, 1)
    return (x - m) / s


def digits(size: int = 32, channels: int = 3) -> ImageData:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled and normalized to [-1, 1].

    The set ships inside scikit-learn, so demos and tests run without any download.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).repeat(1, channels, 1, 1)
    x = (x - 0.5) / 0.5
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return ImageData(
        images=x.contiguous(),
        labels=labels,
        classes=[str(i) for i in range(10)],
        source="digits",
    )


def _read_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """Read, resize the short side to `size`, centre-crop, return (C, size, size) in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ArchnetError(
            f"cannot read image {path} ({type(e).__name__}); fix or remove that file"
        ) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _image_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _load_folder(root: Path, size: int, channels: int) -> ImageData:
    files = _image_files(root)
    if not files:
        raise ArchnetError(
            f"no images found in {root}; add {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files "
            "or pass 'digits'"
        )
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _image_files(d))
    labels = classes = None
    if len(class_dirs) >= 2:
        # Class-per-folder layout; loose files at the top level are ignored as unlabeled.
        classes = [d.name for d in class_dirs]
        pairs = [(f, i) for i, d in enumerate(class_dirs) for f in _image_files(d)]
        files = [f for f, _ in pairs]
        labels = torch.tensor([i for _, i in pairs], dtype=torch.int64)
    x = torch.stack([_read_image(f, size, channels) for f in files])
    mean = IMAGENET_MEAN if channels == 3 else (0.5,)
    std = IMAGENET_STD if channels == 3 else (0.5,)
    return ImageData(
        images=_normalize(x, mean, std), labels=labels, classes=classes, source=str(root)
    )


def _load_tensor_file(path: Path, size: int, channels: int) -> ImageData:
    labels = None
    try:
        if path.suffix.lower() == ".npy":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types
        raise ArchnetError(
            f"cannot read tensor file {path} ({type(e).__name__}); save it with torch.save or "
            "numpy.save"
        ) from None
    if isinstance(obj, dict):
        if "images" not in obj:
            raise ArchnetError(
                f"{path} holds a dict without an 'images' key; save {{'images': x, 'labels': y}}"
            )
        labels, obj = obj.get("labels"), obj["images"]
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if not isinstance(obj, torch.Tensor):
        raise ArchnetError(
            f"{path} holds a {type(obj).__name__}, not a tensor; save an (N, C, H, W) tensor"
        )
    x = obj.float()
    if x.ndim == 3 and channels == 1:
        x = x.unsqueeze(1)
    want = (channels, size, size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ArchnetError(
            f"{path} holds images of shape {tuple(obj.shape)}; expected (N, {channels}, "
            f"{size}, {size}), already normalized for the model"
        )
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
        if labels.shape[0] != x.shape[0]:
            raise ArchnetError(
                f"{path} has {x.shape[0]} images but {labels.shape[0]} labels; save one label "
                "per image"
            )
    return ImageData(images=x.contiguous(), labels=labels, source=str(path))


def load_images(path: str | Path, size: int, channels: int = 3) -> ImageData:
    """Load a folder of images (sub-folders as classes) or a saved (N, C, H, W) tensor file.

    Folder images are resized to `size` and ImageNet-normalized; tensor files are taken as
    already normalized and only shape-checked.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ArchnetError(
            f"data path {p} does not exist; pass an image folder, a .pt/.npy file or 'digits'"
        )
    if p.is_dir():
        return _load_folder(p, size, channels)
    if p.suffix.lower() in TENSOR_EXTENSIONS:
        return _load_tensor_file(p, size, channels)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        x = _read_image(p, size, channels).unsqueeze(0)
        mean = IMAGENET_MEAN if channels == 3 else (0.5,)
        std = IMAGENET_STD if channels == 3 else (0.5,)
        return ImageData(images=_normalize(x, mean, std), source=str(p))
    raise ArchnetError(
        f"cannot load data from {p}: unknown file type '{p.suffix}'; pass an image folder, "
        "a .pt/.npy file or 'digits'"
    )


def load_data(spec: str | Path, size: int, channels: int = 3) -> ImageData:
    """Resolve a data spec: 'digits' for the built-in set, otherwise a path."""
    if str(spec).strip().lower() == "digits":
        return digits(size=size, channels=channels)
    return load_images(spec, size=size, channels=channels)


def batches(
    data: torch.Tensor | ImageData,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Yield mini-batches: tensors for a tensor or unlabeled data, (images, labels) otherwise."""
    if batch_size < 1:
        raise ArchnetError(f"batch size {batch_size} must be at least 1")
    images = data.images if isinstance(data, ImageData) else data
    labels = data.labels if isinstance(data, ImageData) else None
    n = int(images.shape[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, n, batch_size):
        idx = (
            slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        )
        if labels is None:
            yield images[idx]
        else:
            yield images[idx], labels[idx]
