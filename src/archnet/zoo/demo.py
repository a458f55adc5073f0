"""The demo teacher: tiny_effnet trained on the built-in digits, with a fixed held-out split."""

from __future__ import annotations

import torch
from torch import nn

from archnet.data import ImageData, digits
from archnet.zoo.registry import create_model
from archnet.zoo.train import train_classifier

__all__ = ["DEMO_EPOCHS", "DEMO_LR", "demo_data", "demo_teacher"]

DEMO_EPOCHS = 8
DEMO_LR = 4e-3
DEMO_SPLIT_SEED = 0


def demo_data(size: int = 32) -> tuple[ImageData, ImageData]:
    """Digits at `size` x `size`, split 80% train / 20% held-out; the split never changes."""
    return digits(size=size).split(0.8, seed=DEMO_SPLIT_SEED)


def demo_teacher(
    seed: int = 0, epochs: int | None = None, progress: bool = False
) -> tuple[nn.Module, ImageData, ImageData]:
    """Train the demo teacher; returns (teacher in eval mode, train split, held-out split)."""
    train, held_out = demo_data()
    torch.manual_seed(seed)  # the initial weights too, so a seed names one teacher
    model = create_model("tiny_effnet", num_classes=10)
    model = train_classifier(
        model,
        train,
        epochs=DEMO_EPOCHS if epochs is None else epochs,
        lr=DEMO_LR,
        seed=seed,
        progress=progress,
    )
    return model, train, held_out
