"""Teacher Attention gates and Residual Feature Adaptation adapters: neutral at the start, able
to act once trained, for NCHW and channels-last features."""

from __future__ import annotations

import pytest
import torch

from archnet.distill.aids import ResidualAdapter, TeacherGate, TokenAdapter, TokenGate


def test_gate_and_adapter_start_neutral() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(4, 16, 5, 5), torch.randn(4, 16, 5, 5)
    gate, adapter = TeacherGate(16), ResidualAdapter(16)
    g = gate(t)
    assert g.shape == (4, 16, 1, 1) and torch.equal(g, torch.ones_like(g))
    assert torch.equal(adapter(s), s)
    with torch.no_grad():
        gate.fc2.bias.fill_(-3.0)
    assert torch.all(gate(t) < 0.2)  # 2 * sigmoid(-3): the gate can damp channels


@pytest.mark.parametrize("shape", [(4, 17, 32), (4, 5, 5, 32), (4, 32)])
def test_channels_last_gate_and_adapter_start_neutral(shape) -> None:
    torch.manual_seed(0)
    t, s = torch.randn(*shape), torch.randn(*shape)
    gate, adapter = TokenGate(32), TokenAdapter(32)
    g = gate(t)
    assert g.shape == (4, *([1] * (len(shape) - 2)), 32) and torch.equal(g, torch.ones_like(g))
    assert torch.equal(adapter(s), s)
    assert adapter.down.out_features == 4  # Arch-Net's d -> d/16 bottleneck (at least 4)
    with torch.no_grad():
        adapter.up.weight.normal_()
    assert not torch.allclose(adapter(s), s)  # it can learn a correction
