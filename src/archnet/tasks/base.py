"""The ``Task`` interface and its registry."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from archnet.errors import ArchnetError

__all__ = [
    "Task",
    "decisions",
    "get_task",
    "list_tasks",
    "output_kind",
    "output_similarity",
    "register_task",
]

# the metrics tasks report, every one a percentage, and how a report names them
METRICS = {
    "top1": "top-1",
    "label_accuracy": "label accuracy",
    "exact_match": "exact match",
    "explained_variance": "explained variance",
}
# the agreement figure of each task that counts equal decisions, and how a report says it
DECISIONS = {
    "argmax_agreement": "same class",
    "label_agreement": "same label decisions",
    "close_agreement": "same output within 10%",
}


def decisions(agreement: dict[str, Any]) -> tuple[str, float]:
    """(words, share) of the decisions a student takes as its teacher does, from whichever
    decision figure its task's agreement holds."""
    key = next(k for k in DECISIONS if k in agreement)
    return DECISIONS[key], float(agreement[key])


def output_similarity(student_out: torch.Tensor, teacher_out: torch.Tensor) -> dict[str, float]:
    """``relative_mse``: ||s - t||^2 / ||t||^2 per sample, averaged; ``cosine``: cosine
    similarity of the output vectors, averaged. Any task's outputs, labels or not."""
    s, t = student_out.flatten(1).float(), teacher_out.flatten(1).float()
    return {
        "relative_mse": float(((s - t).pow(2).sum(1) / t.pow(2).sum(1).clamp_min(1e-12)).mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(s, t, dim=1).mean()),
    }


class Task(abc.ABC):
    """Data and outputs of one kind of model, as every stage sees them."""

    name: str = ""

    def inputs(self, store: Any, split: str) -> torch.Tensor:
        """The model inputs of a split (``train``, ``selection``, ``eval``) of a run."""
        return store.images(split)

    def targets(self, store: Any, split: str) -> torch.Tensor | None:
        """The split's ground truth, None when unlabelled (conversions never train on it)."""
        return store.labels(split)

    @torch.no_grad()
    def outputs(self, model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> Any:
        """The model's outputs on ``inputs``, in eval mode, batch by batch (each batch moved to
        the model's device, the outputs returned on the CPU)."""
        model.eval()
        device = next(model.parameters(), torch.empty(0)).device
        parts = [
            model(inputs[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(inputs), batch_size)
        ]
        return torch.cat(parts)

    @abc.abstractmethod
    def distill_loss(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """The label-free loss that makes a student's outputs follow its teacher's."""

    def divergence(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> float:
        """How far a student's outputs are from the teacher's: the scores the search reads."""
        return max(float(self.distill_loss(student_out, teacher_out)), 0.0)

    @abc.abstractmethod
    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """The figures a user reads on labelled data (top-1 for classifiers)."""

    @abc.abstractmethod
    def agreement(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> dict[str, float]:
        """How closely a student's outputs follow its teacher's, labels or not."""


_tasks: dict[str, Callable[[], Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def decorator(cls: type[Task]) -> type[Task]:
        cls.name = name
        _tasks[name] = cls
        return cls

    return decorator


def list_tasks() -> list[str]:
    return list(_tasks)


def get_task(name: str) -> Task:
    """The task registered as ``name``; one line naming the known ones otherwise."""
    if name not in _tasks:
        raise ArchnetError(f"unknown task {name!r}; use one of: {', '.join(_tasks)}")
    return _tasks[name]()


@torch.no_grad()
def output_kind(outputs: torch.Tensor) -> tuple[str, str]:
    """(task name, why) read from a teacher's outputs on a batch, for ``task = "auto"``.

    One value per sample is a regression; rows of probabilities (in [0, 1]) that do not sum to
    one are independent sigmoids; anything else with two or more values per sample is read as
    class logits, the common case (logits alone cannot tell a softmax from sigmoids: name the
    task when the model is multi-label and ends in logits)."""
    flat = outputs.reshape(len(outputs), -1).float()
    if flat.shape[1] == 1:
        return "regression", "one output value per sample"
    probabilities = bool(((flat >= 0) & (flat <= 1)).all())
    if probabilities and not torch.allclose(flat.sum(1), torch.ones(len(flat)), atol=1e-3):
        return "multilabel", "outputs in [0, 1] that do not sum to 1 (sigmoids)"
    return "classification", f"{flat.shape[1]} outputs per sample (class logits)"
