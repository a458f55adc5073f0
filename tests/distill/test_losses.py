"""Normalized MSE and the distillation KL."""

from __future__ import annotations

import pytest
import torch

from archnet.distill.losses import kd_kl, nmse


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)


def test_nmse_zero_for_equal(pair) -> None:
    a, _ = pair
    assert nmse(a, a.clone()).item() == 0.0


def test_nmse_scale_invariant(pair) -> None:
    a, b = pair
    base = nmse(a, b)
    assert base.item() > 0
    torch.testing.assert_close(nmse(2 * a, 2 * b), base)
    torch.testing.assert_close(nmse(1e-3 * a, 1e-3 * b), base)


def test_nmse_value_and_per_sample_normalization() -> None:
    target = torch.ones(2, 4)
    target[1] *= 10.0  # a sample with 100x the energy
    pred = target.clone()
    pred[:, 0] += target[:, 0]  # each sample off by its own scale in one of 4 entries
    # per-sample ||e||^2 / ||t||^2 = 1/4 for both samples
    assert nmse(pred, target).item() == pytest.approx(0.25)
    assert nmse(torch.zeros(3, 2), torch.ones(3, 2)).item() == pytest.approx(1.0)


def test_nmse_of_zero_target_is_finite() -> None:
    value = nmse(torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.isfinite(value)


def test_nmse_gradient_flows(pair) -> None:
    a, b = pair
    a = a.requires_grad_()
    nmse(a, b).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_kd_kl_zero_for_equal_logits() -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    assert kd_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # softmax is shift-invariant, so a constant offset is no difference either
    assert kd_kl(logits + 3.0, logits, t=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_kl_positive_for_different_logits() -> None:
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    assert kd_kl(s, t).item() > 0
    assert kd_kl(s, t, t=4.0).item() > 0


def test_kd_kl_matches_definition() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 1.0, 0.5]])
    temp = 2.0
    p_t = torch.softmax(t / temp, -1)
    p_s = torch.softmax(s / temp, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum() * temp**2
    assert kd_kl(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-5)
