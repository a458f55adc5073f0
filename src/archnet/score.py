"""Replace-one-block scoring: how much the teacher's outputs move when one block is swapped.

The blockwise loss says how well a candidate copies its block; this score says how much that
matters downstream (Puzzle, HANT). It is the task's divergence (KL for a classifier) of the
teacher's outputs from those of the teacher with only this block replaced, on held-out data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from archnet.tasks import Task


@contextlib.contextmanager
def swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put ``module`` at ``name`` in ``model`` (no deep copy of the network)."""
    original = model.get_submodule(name)
    model.set_submodule(name, module)
    try:
        yield model
    finally:
        model.set_submodule(name, original)


@torch.no_grad()
def replace_one_block(
    task: Task,
    teacher: nn.Module,
    name: str,
    candidate: nn.Module,
    inputs: torch.Tensor,
    teacher_out: torch.Tensor,
    eval_inputs: torch.Tensor | None = None,
    eval_targets: torch.Tensor | None = None,
) -> dict[str, float]:
    """The task's divergence of the teacher-with-candidate from the teacher (``kl``), and its
    metrics (``top1``) where labelled data exist."""
    with swapped(teacher, name, candidate.eval()):
        out = {"kl": task.divergence(task.outputs(teacher, inputs), teacher_out)}
        if eval_inputs is not None and eval_targets is not None:
            out.update(task.metrics(task.outputs(teacher, eval_inputs), eval_targets))
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation; None when either side is constant or too short to rank."""
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)
