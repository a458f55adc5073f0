"""Tasks for other kinds of outputs than one softmax: independent sigmoids (multi-label) and
real values (regression). What differs is the distillation loss and the figures; data and
forward are the image classifier's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archnet.tasks.base import Task, output_similarity, register_task

__all__ = ["CLOSE", "MultiLabel", "Regression"]

#: a regression output "agrees" with its teacher within this relative error (in norm)
CLOSE = 0.1


@register_task("multilabel")
class MultiLabel(Task):
    """One independent sigmoid per output: distilled by the binary KL divergence of each label's
    softened probability, measured by the share of correct label decisions at 0.5."""

    def distill_loss(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        s, t = student_out / temperature, teacher_out / temperature
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (
            F.logsigmoid(-t) - F.logsigmoid(-s)
        )
        return kl.flatten(1).sum(1).mean() * temperature * temperature

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Against multi-hot targets; a class index per sample reads as its one positive label."""
        if targets.dim() == 1:
            targets = F.one_hot(targets.long(), outputs.shape[1])
        hits = (outputs > 0) == (targets > 0.5)
        return {
            "label_accuracy": float(hits.float().mean() * 100),
            "exact_match": float(hits.flatten(1).all(1).float().mean() * 100),
        }

    @torch.no_grad()
    def agreement(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> dict[str, float]:
        """``label_agreement``: share of label decisions equal to the teacher's, and the
        relative MSE, cosine and divergence of the outputs."""
        same = (student_out > 0) == (teacher_out > 0)
        return {
            "label_agreement": float(same.float().mean()),
            **output_similarity(student_out, teacher_out),
            "kl": self.divergence(student_out, teacher_out),
        }


@register_task("regression")
class Regression(Task):
    """Real-valued outputs: distilled by the mean squared error relative to the teacher's output
    energy (scale-free, so one temperature-free loss serves any units), measured by the share of
    the targets' variance explained."""

    def distill_loss(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        s, t = student_out.flatten(1).float(), teacher_out.flatten(1).float()
        return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        y, p = targets.float().reshape(len(targets), -1), outputs.float().reshape(len(outputs), -1)
        residual = (y - p).pow(2).sum()
        total = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        return {"explained_variance": float((1 - residual / total) * 100)}

    @torch.no_grad()
    def agreement(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> dict[str, float]:
        """``close_agreement``: share of samples whose output is within ``CLOSE`` of the
        teacher's, measured against the teacher's typical output size (its root mean square
        over the split: per-sample ratios explode where a target is near zero);
        ``relative_mse``: the same scale-free error as the loss; ``cosine`` per sample."""
        s, t = student_out.flatten(1).float(), teacher_out.flatten(1).float()
        scale = t.pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
        close = (s - t).norm(dim=1) <= CLOSE * scale
        return {
            "close_agreement": float(close.float().mean()),
            "relative_mse": float(self.distill_loss(s, t)),
            "cosine": output_similarity(s, t)["cosine"],
        }
