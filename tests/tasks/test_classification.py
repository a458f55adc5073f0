"""The image-classification task: outputs in batches, top-1, distillation loss, agreement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archnet.errors import ArchnetError
from archnet.tasks import ImageClassification, get_task, list_tasks

TASK = get_task("classification")


def test_registry() -> None:
    assert isinstance(TASK, ImageClassification) and "classification" in list_tasks()
    with pytest.raises(ArchnetError, match="unknown task 'detection'; use one of"):
        get_task("detection")


def test_outputs_batch_like_one_forward_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    x = torch.randn(23, 6)
    got = TASK.outputs(model.train(), x, batch_size=5)
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_top1() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert TASK.metrics(logits, torch.tensor([0, 1, 2, 0])) == {"top1": pytest.approx(100.0)}
    assert TASK.metrics(logits, torch.tensor([0, 1, 0, 2]))["top1"] == pytest.approx(50.0)
    assert TASK.metrics(logits, torch.tensor([1, 2, 0, 2]))["top1"] == pytest.approx(0.0)


def test_distillation_loss_and_agreement() -> None:
    torch.manual_seed(0)
    t = torch.randn(16, 5)
    assert float(TASK.distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    s = t + 0.5 * torch.randn(16, 5)
    assert TASK.divergence(s, t) > 1e-3
    assert TASK.distill_loss(s, t, temperature=2.0) != TASK.distill_loss(s, t)
    same = TASK.agreement(t, t)
    assert same["argmax_agreement"] == 1.0 and same["relative_mse"] == pytest.approx(0.0)
    flipped = TASK.agreement(-t, t)
    assert flipped["argmax_agreement"] < 0.5 and flipped["cosine"] == pytest.approx(-1.0)
