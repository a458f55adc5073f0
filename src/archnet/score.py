"""Replace-one-block scoring: how much the teacher's outputs move when one block is swapped.

The blockwise loss says how well a candidate copies its block; this score says how much that
matters downstream (Puzzle, HANT). It is the KL divergence of the teacher's output
distribution from that of the teacher with only this block replaced, on held-out data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from archnet.distill.losses import kd_kl


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
def logits_of(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(-1) == labels).float().mean() * 100)


@torch.no_grad()
def replace_one_block(
    teacher: nn.Module,
    name: str,
    candidate: nn.Module,
    images: torch.Tensor,
    teacher_logits: torch.Tensor,
    eval_images: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """KL(teacher || teacher-with-candidate) per sample, and top-1 where labelled data exist."""
    with swapped(teacher, name, candidate.eval()):
        out = {"kl": max(float(kd_kl(logits_of(teacher, images), teacher_logits)), 0.0)}
        if eval_images is not None and eval_labels is not None:
            out["top1"] = top1(logits_of(teacher, eval_images), eval_labels)
    return out


@torch.no_grad()
def agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """How closely a student's outputs follow its teacher's, with or without labels.

    ``argmax_agreement``: share of samples whose top class is the teacher's; ``relative_mse``:
    ||s - t||^2 / ||t||^2 per sample, averaged; ``cosine``: cosine similarity of the output
    vectors, averaged; ``kl``: KL(teacher || student) of the output distributions.
    """
    s, t = student.flatten(1).float(), teacher.flatten(1).float()
    return {
        "argmax_agreement": float((s.argmax(1) == t.argmax(1)).float().mean()),
        "relative_mse": float(((s - t).pow(2).sum(1) / t.pow(2).sum(1).clamp_min(1e-12)).mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(s, t, dim=1).mean()),
        "kl": max(float(kd_kl(s, t)), 0.0),
    }


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation; None when either side is constant or too short to rank."""
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)
