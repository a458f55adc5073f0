"""BatchNorm statistics: re-estimated after training in the layers the student changed, and
kept as they are everywhere else.

The teacher's own statistics were estimated on its training data; re-estimating them on the
(smaller, unlabeled) conversion data only moves a kept layer away from the teacher, so layers
the student kept from the teacher stay in eval mode while the student trains and are left
alone afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_BN = nn.modules.batchnorm._BatchNorm


def _within(name: str, scopes: Sequence[str] | None) -> bool:
    """Whether module ``name`` lies in one of ``scopes`` (None: everywhere; "" is the root)."""
    if scopes is None:
        return True
    return any(s == "" or name == s or name.startswith(s + ".") for s in scopes)


def batch_norms(model: nn.Module, scopes: Sequence[str] | None = None) -> list[_BN]:
    return [m for n, m in model.named_modules() if isinstance(m, _BN) and _within(n, scopes)]


def freeze_outside(model: nn.Module, scopes: Sequence[str] | None) -> list[RemovableHandle]:
    """Keep every BatchNorm outside ``scopes`` in eval mode, whatever ``model.train()`` says:
    it normalizes with its stored statistics and never updates them. Remove the returned
    handles to undo."""

    def to_eval(module: nn.Module, _args: tuple) -> None:
        module.training = False

    return [
        m.register_forward_pre_hook(to_eval)
        for n, m in model.named_modules()
        if isinstance(m, _BN) and not _within(n, scopes)
    ]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    scopes: Sequence[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Recompute the running statistics of the BatchNorms in ``scopes`` (None: all) as exact
    averages over ``batches``.

    After short trainings the exponential running averages lag behind the weights, so the
    eval-mode network can sit far from the train-mode one; one clean pass fixes that.
    Needs no labels. The model's train/eval mode is restored. ``forward(model, batch)`` runs
    a batch that is more than the input tensor (default: ``model(batch)``).
    """
    bns = batch_norms(model, scopes)
    if not bns:
        return model
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    try:
        for batch in batches:
            forward(model, batch) if forward else model(batch)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.train(was_training)
    return model
