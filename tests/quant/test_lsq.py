"""LSQ fake-quantizer: grid, range, gradients, initialisation and state-dict round trip."""

from __future__ import annotations

import math

import pytest
import torch

from archnet.quant import LSQQuantizer, quant_range


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_values_on_grid_and_in_range(bits: int, signed: bool) -> None:
    torch.manual_seed(0)
    q = LSQQuantizer(bits, signed)
    x = torch.randn(4, 8, 5, 5) * 3
    y = q(x).detach()
    s = q.step.detach()
    levels = y / s
    qmin, qmax = quant_range(bits, signed)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.min() >= qmin - 1e-4 and levels.max() <= qmax + 1e-4
    assert len(levels.round().unique()) <= 2**bits


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        LSQQuantizer(bits)


def test_ranges() -> None:
    assert quant_range(4, True) == (-8, 7)
    assert quant_range(4, False) == (0, 15)
    assert quant_range(2, True) == (-2, 1)


def test_lsq_init_rule() -> None:
    x = torch.randn(1000)
    q = LSQQuantizer(4, True)
    q(x)
    expected = 2 * x.abs().mean() / math.sqrt(7)
    assert torch.allclose(q.step.detach(), expected.reshape(1))
    assert bool(q.initialized)


def test_ste_gradient_inside_and_outside_range() -> None:
    q = LSQQuantizer(4, True)
    with torch.no_grad():
        q(torch.ones(1))
        q.step.fill_(0.5)  # grid [-4.0, 3.5]
    x = torch.tensor([-10.0, -1.2, 0.3, 2.0, 10.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert q.step.grad is not None and q.step.grad.abs().sum() > 0


def test_step_gradient_scale() -> None:
    """Outside the range d/ds = qmax (or qmin), times LSQ's g = 1/sqrt(N * qmax)."""
    q = LSQQuantizer(4, True)
    with torch.no_grad():
        q(torch.ones(1))
        q.step.fill_(0.5)
    x = torch.full((16,), 100.0)
    q(x).sum().backward()
    g = 1 / math.sqrt(16 * 7)
    assert q.step.grad.item() == pytest.approx(16 * 7 * g, rel=1e-5)


def test_per_channel_step_shape() -> None:
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    q = LSQQuantizer(4, True, per_channel=True, num_channels=6)
    q(w)
    assert q.step.shape == (6,)
    expected = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
    assert torch.allclose(q.step.detach(), expected)
    lazy = LSQQuantizer(4, True, per_channel=True, channel_axis=1)
    lazy(torch.randn(2, 5, 4))
    assert lazy.step.shape == (5,)


def test_loaded_state_is_not_reinitialised() -> None:
    q = LSQQuantizer(4, True, per_channel=True, num_channels=3)
    q(torch.randn(3, 8))
    with torch.no_grad():
        q.step.fill_(0.123)
    fresh = LSQQuantizer(4, True, per_channel=True, num_channels=3)
    fresh.load_state_dict(q.state_dict())
    fresh(torch.randn(3, 8) * 100)
    assert torch.allclose(fresh.step.detach(), torch.full((3,), 0.123))


def test_inferred_sign_follows_calibration_data_and_survives_state_dict() -> None:
    q = LSQQuantizer(4, True, infer_sign=True)
    q(torch.rand(64))  # no negative values: one more bit of resolution, unsigned
    assert not q.signed and (q.qmin, q.qmax) == (0, 15)
    again = LSQQuantizer(4, True, infer_sign=True)
    again.load_state_dict(q.state_dict())
    assert not again.signed and bool(again.initialized)
    signed = LSQQuantizer(4, True, infer_sign=True)
    signed(torch.randn(64))
    assert signed.signed and (signed.qmin, signed.qmax) == (-8, 7)


def test_fixed_sign_is_not_inferred() -> None:
    q = LSQQuantizer(4, True)
    q(torch.rand(64))
    assert q.signed


def test_short_negative_tail_gets_an_unsigned_grid_with_a_zero_point() -> None:
    """After SiLU (minimum -0.28) a signed grid would spend half its levels on values that
    hardly occur; the shifted unsigned grid keeps them and 13+ levels for the rest."""
    torch.manual_seed(0)
    x = torch.nn.functional.silu(torch.randn(4096) * 2)
    q = LSQQuantizer(4, True, infer_sign=True)
    y = q(x)
    assert not q.signed and q.zero_point_value >= 1
    assert (q.qmin, q.qmax) == (-q.zero_point_value, 15 - q.zero_point_value)
    assert y.min() < 0 and len(torch.unique(y)) <= 16
    symmetric = LSQQuantizer(4, True)
    assert (y - x).pow(2).mean() < (symmetric(x) - x).pow(2).mean()
    again = LSQQuantizer(4, True, infer_sign=True)
    again.load_state_dict(q.state_dict())
    assert again.zero_point_value == q.zero_point_value and torch.equal(again(x), y)


def test_two_sided_input_keeps_the_signed_grid() -> None:
    q = LSQQuantizer(4, True, infer_sign=True)
    q(torch.randn(4096))
    assert q.signed and q.zero_point_value == 0


def test_state_dict_without_zero_point_loads_as_zero() -> None:
    """Checkpoints written before zero points existed had none."""
    q = LSQQuantizer(4, True, infer_sign=True)
    q(torch.rand(64))
    state = {k: v for k, v in q.state_dict().items() if k != "zero_point"}
    fresh = LSQQuantizer(4, True, infer_sign=True)
    fresh.load_state_dict(state)
    assert fresh.zero_point_value == 0 and (fresh.qmin, fresh.qmax) == (0, 15)
