"""Data the user holds as files: image folders (sub-folders as classes), single images, tensors.

Folder and image files are resized and ImageNet-normalized here; tensor files are taken as
already normalized for the model and only shape-checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from archnet.errors import ArchnetError

from .imagedata import ImageData, Size, height_width, normalize

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TENSOR_EXTENSIONS",
    "WHAT_TO_PASS",
    "load_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TENSOR_EXTENSIONS = (".pt", ".pth", ".npy")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The end of every "cannot load" message: what --data accepts.
WHAT_TO_PASS = "pass an image folder, a .pt/.npy file, an image, or 'fashion-mnist' / 'digits'"


def _folder_norm(x: torch.Tensor, channels: int) -> torch.Tensor:
    if channels == 3:
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    return normalize(x, (0.5,), (0.5,))


def _read_image(path: Path, size: Size, channels: int) -> torch.Tensor:
    """Read, resize to cover (H, W) keeping the aspect ratio, centre-crop, return (C, H, W)
    in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    out_h, out_w = height_width(size)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            w, h = img.size
            scale = max(out_h / h, out_w / w)
            nw, nh = max(out_w, round(w * scale)), max(out_h, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - out_w) // 2, (nh - out_h) // 2
            img = img.crop((left, top, left + out_w, top + out_h))
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


def _load_folder(root: Path, size: Size, channels: int) -> ImageData:
    files = _image_files(root)
    if not files:
        raise ArchnetError(
            f"no images found in {root}; add {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files "
            "or pass 'fashion-mnist' / 'digits'"
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
    return ImageData(
        images=_folder_norm(x, channels), labels=labels, classes=classes, source=str(root)
    )


def _load_tensor_file(path: Path, shape: tuple[int, ...]) -> ImageData:
    """An (N, *shape) tensor, or a dict with ``images`` and ``labels``: any input shape
    (images, 1-D frames, token features), already as the model takes it."""
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
    if len(shape) == 3 and shape[0] == 1 and x.ndim == 3:
        x = x.unsqueeze(1)  # (N, H, W) grayscale images
    if tuple(x.shape[1:]) != tuple(shape):
        dims = ", ".join(map(str, shape))
        raise ArchnetError(
            f"{path} holds inputs of shape {tuple(obj.shape)}; expected (N, {dims}), already "
            "normalized for the model (or pass the --input-size they have)"
        )
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
        if labels.shape[0] != x.shape[0]:
            raise ArchnetError(
                f"{path} has {x.shape[0]} images but {labels.shape[0]} labels; save one label "
                "per image"
            )
    return ImageData(images=x.contiguous(), labels=labels, source=str(path))


def load_images(
    path: str | Path, size: Size, channels: int = 3, shape: tuple[int, ...] | None = None
) -> ImageData:
    """Load a folder of images (sub-folders as classes), one image (both resized to ``size``,
    a side or (H, W)), or an (N, *shape) tensor file (``shape`` defaults to (C, H, W))."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ArchnetError(f"data path {p} does not exist; {WHAT_TO_PASS}")
    suffix = p.suffix.lower()
    if suffix in TENSOR_EXTENSIONS:
        return _load_tensor_file(p, shape or (channels, *height_width(size)))
    if shape is not None and len(shape) != 3:
        raise ArchnetError(
            f"{p} holds images, but the input size {tuple(shape)} is not C,H,W; save the inputs "
            "as an (N, ...) .pt/.npy tensor"
        )
    if p.is_dir():
        return _load_folder(p, size, channels)
    if suffix in IMAGE_EXTENSIONS:
        x = _read_image(p, size, channels).unsqueeze(0)
        return ImageData(images=_folder_norm(x, channels), source=str(p))
    raise ArchnetError(f"cannot load data from {p}: unknown file type '{p.suffix}'; {WHAT_TO_PASS}")
