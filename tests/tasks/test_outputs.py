"""Regression outputs, and the task read from a teacher's outputs when none is named."""

from __future__ import annotations

import pytest
import torch

from archnet.data import ImageData
from archnet.tasks import decisions, get_task, output_kind
from archnet.zoo import create_model

TASK = get_task("regression")


def test_regression_loss_is_zero_only_at_the_teacher_and_scale_free():
    t = torch.randn(8, 3)
    assert float(TASK.distill_loss(t, t)) == 0.0
    assert float(TASK.distill_loss(t + 0.5, t)) > 0.1
    # the same relative error in other units costs the same
    assert float(TASK.distill_loss(100 * (t + 0.5), 100 * t)) == pytest.approx(
        float(TASK.distill_loss(t + 0.5, t)), rel=1e-4
    )


def test_regression_metrics_and_agreement():
    y = torch.linspace(-1, 1, 50)[:, None]
    assert TASK.metrics(y, y) == {"explained_variance": 100.0}
    assert TASK.metrics(torch.zeros_like(y), y)["explained_variance"] == pytest.approx(
        0.0, abs=1e-4
    )
    agree = TASK.agreement(y * 1.05, y)  # 5% off everywhere: within the 10% tolerance
    assert decisions(agree) == ("same output within 10%", 1.0)
    assert TASK.agreement(y + 0.5, y)["close_agreement"] == 0.0  # 0.5 > 10% of rms(y) = 0.06


@pytest.mark.parametrize(
    ("outputs", "kind"),
    [
        (torch.randn(16, 1), "regression"),
        (torch.randn(16), "regression"),
        (torch.randn(16, 10), "classification"),
        (torch.randn(16, 10).softmax(1), "classification"),
        (torch.randn(16, 5).sigmoid(), "multilabel"),
    ],
)
def test_output_kind(outputs, kind):
    assert output_kind(outputs)[0] == kind


def test_a_regression_teacher_is_recognised_and_converted(tmp_path, digits_data):
    """tiny_resnet trained to read the digit's value: one real output per image."""
    from archnet import convert
    from tests.conftest import tiny_config

    train, held = digits_data
    torch.manual_seed(0)
    model = create_model("tiny_resnet", num_classes=1)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    y = train.labels.float()[:, None] / 9
    for _ in range(3):
        for i in range(0, len(train), 64):
            loss = torch.nn.functional.mse_loss(model(train.images[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    eval_data = ImageData(held.images[48:112], held.labels[48:112].float()[:, None] / 9, None, "e")
    result = convert(
        model,
        held.images[:48],
        budget=0.7,
        out=tmp_path / "r",
        eval_data=eval_data,
        config=tiny_config(),
    )
    report = result.report
    assert 'task = "regression"' in (result.run_dir / "config.toml").read_text()
    assert report["teacher"]["explained_variance"] > 50.0  # the teacher learned the digits
    assert report["student"]["explained_variance"] > 50.0
    assert report["agreement"]["relative_mse"] < 0.25 and "close_agreement" in report["agreement"]
    assert "explained variance" in (result.run_dir / "report.md").read_text()
