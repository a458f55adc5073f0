"""`ImageData`, the one container every data source returns, and what works on any of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from archnet.errors import ArchnetError

__all__ = ["ImageData", "batches", "check_finite", "normalize"]


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

    def take(self, index: torch.Tensor, tag: str) -> ImageData:
        """The images (and labels) at ``index``; ``tag`` names the part in ``source``."""
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
        return self.take(perm[:n_first], "split-a"), self.take(perm[n_first:], "split-b")

    def subset(self, n: int) -> ImageData:
        """The first `n` images (all of them when `n` exceeds the size)."""
        n = min(max(int(n), 0), len(self))
        return self.take(torch.arange(n), f":{n}")


Size = int | tuple[int, int]  # an image side, or (height, width)


def height_width(size: Size) -> tuple[int, int]:
    """``32 -> (32, 32)``; ``(32, 48)`` as it is."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel (x - mean) / std; one-value mean/std apply to every channel."""
    c = x.shape[1]
    m = torch.tensor((mean * c)[:c], dtype=x.dtype).view(1, c, 1, 1)
    s = torch.tensor((std * c)[:c], dtype=x.dtype).view(1, c, 1, 1)
    return (x - m) / s


def check_finite(images: torch.Tensor, source: str) -> None:
    """Refuse images holding NaN or infinity now, not at the ONNX check many minutes later."""
    if images.numel() == 0 or not images.is_floating_point():
        return
    flat = images.reshape(images.shape[0], -1)
    # A sum is NaN or infinite whenever a term is, and is ten times cheaper than an elementwise
    # test; only the images it flags (or whose sum merely overflowed) are looked at closely.
    suspect = (~torch.isfinite(flat.sum(dim=1))).nonzero().flatten()
    if suspect.numel() == 0:
        return
    bad = suspect[~torch.isfinite(flat[suspect]).all(dim=1)]
    count = int(bad.numel())
    if count:
        first = int(bad[0])
        held = "image holds" if count == 1 else "images hold"
        raise ArchnetError(
            f"data {source}: {count} {held} NaN or infinity (first: index {first}); "
            "clean or drop them"
        )


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
