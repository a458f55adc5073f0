"""Image classification: class logits, KL distillation, top-1."""

from __future__ import annotations

import torch

from archnet.distill.losses import kd_kl
from archnet.tasks.base import Task, register_task

__all__ = ["ImageClassification"]


@register_task("classification")
class ImageClassification(Task):
    """A classifier's logits: distilled by KL divergence of the softened class distributions
    (Hinton et al.), measured by top-1."""

    def distill_loss(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        return kd_kl(student_out, teacher_out, temperature)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {"top1": float((outputs.argmax(-1) == targets).float().mean() * 100)}

    @torch.no_grad()
    def agreement(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> dict[str, float]:
        """``argmax_agreement``: share of samples whose top class is the teacher's;
        ``relative_mse``: ||s - t||^2 / ||t||^2 per sample, averaged; ``cosine``: cosine
        similarity of the output vectors, averaged; ``kl``: KL(teacher || student)."""
        s, t = student_out.flatten(1).float(), teacher_out.flatten(1).float()
        return {
            "argmax_agreement": float((s.argmax(1) == t.argmax(1)).float().mean()),
            "relative_mse": float(
                ((s - t).pow(2).sum(1) / t.pow(2).sum(1).clamp_min(1e-12)).mean()
            ),
            "cosine": float(torch.nn.functional.cosine_similarity(s, t, dim=1).mean()),
            "kl": self.divergence(s, t),
        }
