"""Distillation losses shared by blockwise training, scoring and the end-to-end fine-tune."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nmse(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalized MSE, ||pred - target||^2 / ||target||^2 per sample, averaged.

    Normalizing by the target's energy makes losses comparable across blocks whose feature
    scales differ by orders of magnitude (the choice of HANT and Puzzle).
    """
    dims = tuple(range(1, pred.dim()))
    err = (pred - target).pow(2).sum(dims)
    return (err / target.pow(2).sum(dims).clamp_min(eps)).mean()


def kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by t^2 (Hinton et al.)."""
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t
