"""What the pipeline knows of data and outputs, behind one object per kind of model.

Stages never touch images, class logits or argmax themselves: they ask the run's ``Task`` for
a split's inputs and targets, the model's outputs on them, the distillation loss between two
outputs, the metrics a user reads, and how closely a student follows its teacher. Image
classification, multi-label, regression and translation register here.
"""

from archnet.tasks.base import (
    METRICS,
    Task,
    decisions,
    get_task,
    list_tasks,
    output_kind,
    register_task,
)
from archnet.tasks.classification import ImageClassification
from archnet.tasks.outputs import MultiLabel, Regression
from archnet.tasks.translation import TokenLogits, Translation

__all__ = [
    "METRICS",
    "ImageClassification",
    "MultiLabel",
    "Regression",
    "Task",
    "TokenLogits",
    "Translation",
    "decisions",
    "get_task",
    "list_tasks",
    "output_kind",
    "register_task",
]
