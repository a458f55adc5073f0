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


def test_multilabel_distils_each_sigmoid_and_counts_label_decisions() -> None:
    from archnet.tasks import decisions

    task = get_task("multilabel")
    torch.manual_seed(0)
    t = torch.randn(32, 6) * 3
    assert float(task.distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    # a student that matches the softmax but not the sigmoids: same class, other probabilities
    shifted = t + 5.0
    assert TASK.divergence(shifted, t) == pytest.approx(0.0, abs=1e-5)
    assert task.divergence(shifted, t) > 1.0
    targets = (t > 0).float()
    assert task.metrics(t, targets) == {"label_accuracy": 100.0, "exact_match": 100.0}
    flipped = targets.clone()
    flipped[:, 0] = 1 - flipped[:, 0]
    assert task.metrics(t, flipped)["label_accuracy"] == pytest.approx(100 * 5 / 6)
    assert task.metrics(t, flipped)["exact_match"] == 0.0
    assert decisions(task.agreement(t, t)) == ("same label decisions", 1.0)
    assert decisions(TASK.agreement(t, t)) == ("same class", 1.0)


def test_a_multilabel_conversion_reports_its_own_figures(
    tmp_path, tiny_teacher, tiny_images, tiny_eval
):
    from archnet import convert
    from tests.conftest import tiny_config

    result = convert(
        tiny_teacher,
        tiny_images,
        budget=0.7,
        out=tmp_path / "r",
        eval_data=tiny_eval,
        config=tiny_config(task="multilabel"),
    )
    report = result.report
    assert {"label_accuracy", "exact_match"} <= set(report["student"])
    assert (
        "label_agreement" in report["agreement"] and "argmax_agreement" not in report["agreement"]
    )
    text = (result.run_dir / "report.md").read_text()
    assert "same label decisions" in text and "| label accuracy, evaluation split (%) |" in text
