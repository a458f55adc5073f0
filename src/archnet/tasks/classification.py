"""Image classification: class logits, KL distillation, top-1."""

from __future__ import annotations

import torch

from archnet.distill.losses import kd_kl
from archnet.tasks.base import Task, output_similarity, register_task

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
        """``argmax_agreement``: share of samples whose top class is the teacher's; the
        outputs' ``relative_mse`` and ``cosine`` (``output_similarity``); ``kl``:
        KL(teacher || student)."""
        s, t = student_out.flatten(1).float(), teacher_out.flatten(1).float()
        return {
            "argmax_agreement": float((s.argmax(1) == t.argmax(1)).float().mean()),
            **output_similarity(s, t),
            "kl": self.divergence(s, t),
        }
