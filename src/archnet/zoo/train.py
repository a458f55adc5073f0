"""Supervised training and evaluation for the bundled teachers.

Only the demo and the tests train teachers; the recipe (AdamW, one-cycle schedule, label
smoothing, small random shifts) is chosen to converge in seconds on a CPU, not to be general.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from archnet.data import ImageData, batches
from archnet.distill.bn import recalibrate_bn as _recalibrate_bn
from archnet.errors import ArchnetError

__all__ = ["evaluate", "random_shift", "recalibrate_bn", "train_classifier"]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels, repeating the border into the gap."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
    )


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ImageData, batch_size: int = 256) -> nn.Module:
    """Recompute BatchNorm running statistics over ``data`` (see archnet.distill.bn)."""
    return _recalibrate_bn(model, batches(data.images, batch_size))


def _require_labels(data: ImageData, what: str) -> torch.Tensor:
    if data.labels is None:
        raise ArchnetError(
            f"{what} needs labeled data but '{data.source}' has no labels; use a folder with "
            "one sub-folder per class, or 'digits'"
        )
    return data.labels


def train_classifier(
    model: nn.Module,
    train: ImageData,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    max_shift: int = 2,
    bn_recalibrate: bool = True,
) -> nn.Module:
    """Train `model` with cross-entropy on labeled `train`; returns it in eval mode.

    Deterministic for a given seed: shuffling, augmentation and dropout are seeded with
    `seed`. BatchNorm statistics are recomputed on `train` at the end (see `recalibrate_bn`).
    """
    _require_labels(train, "training")
    if epochs < 1 or len(train) == 0:
        raise ArchnetError(f"cannot train for {epochs} epoch(s) on {len(train)} images")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )
        task = bar.add_task("training", total=epochs * steps_per_epoch)
        bar.start()
    model.train()
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            for x, y in batches(train, batch_size, shuffle=True, seed=epoch_seed):
                x = random_shift(x, max_shift, gen)
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
                if bar is not None:
                    bar.update(
                        task,
                        advance=1,
                        description=f"epoch {epoch + 1}/{epochs} loss {total / count:.3f}",
                    )
    finally:
        if bar is not None:
            bar.stop()
    if bn_recalibrate:
        recalibrate_bn(model, train)
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent; the model's train/eval mode is restored afterwards."""
    labels = _require_labels(data, "evaluation")
    if len(data) == 0:
        raise ArchnetError(f"cannot evaluate on '{data.source}': it has no images")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for x, y in batches(data, batch_size):
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / len(labels)
