"""Arch-Distillation: progressive weights, training-only aids, cleanup, ablations, seeds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from archnet.data import digits
from archnet.distill.aids import TeacherGate
from archnet.distill.archnet import (
    ArchDistillConfig,
    _StudentTap,
    arch_distill,
    progressive_weights,
    total_steps,
)
from archnet.distill.finetune import assemble
from archnet.distill.losses import kd_kl
from archnet.zoo.tiny_resnet import BasicBlock
from tests.distill import calibrated_tiny_resnet

NAMES = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
FAST = ArchDistillConfig(epochs_per_stage=0.25, global_epochs=1, batch_size=16, lr=3e-3, shift=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits(size=16).images[:64]


@pytest.fixture(scope="module")
def teacher(images: torch.Tensor) -> nn.Module:
    return calibrated_tiny_resnet(images)


def _student(teacher: nn.Module, seed: int = 1) -> nn.Module:
    """The teacher with its first down-sampling block replaced by a freshly initialised one."""
    torch.manual_seed(seed)
    return assemble(teacher, {"layer2.0": BasicBlock(16, 32, stride=2)})


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- weighting


def test_progressive_weights_follow_decay() -> None:
    for k in range(1, 6):
        w = progressive_weights(k, 0.8)
        assert len(w) == k
        assert math.isclose(sum(w), 1.0)
        for j in range(1, k + 1):
            assert math.isclose(w[j - 1] / w[k - 1], 0.8 ** (k - j))
    assert progressive_weights(1, 0.5) == [1.0]
    assert progressive_weights(3, 1.0) == pytest.approx([1 / 3] * 3)
    assert progressive_weights(3, 0.0) == [0.0, 0.0, 1.0]  # only the newest block
    with pytest.raises(ValueError):
        progressive_weights(0, 0.8)
    with pytest.raises(ValueError):
        progressive_weights(2, -0.1)


def test_total_steps_counts_stages_and_global_epochs() -> None:
    cfg = ArchDistillConfig(epochs_per_stage=0.5, global_epochs=2, batch_size=16)
    assert total_steps(64, 6, cfg) == 6 * 2 + 2 * 4
    assert total_steps(64, 6, ArchDistillConfig(epochs_per_stage=0.01, global_epochs=0)) == 6
    assert total_steps(64, 0, cfg) == 2 * 4
    flat = ArchDistillConfig(
        epochs_per_stage=0.5, global_epochs=2, batch_size=16, progressive=False
    )
    assert total_steps(64, 6, flat) == total_steps(64, 6, cfg)


# ----------------------------------------------------------------------------- training aids


def test_student_tap_gates_what_flows_on_but_records_raw(teacher: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    student = copy.deepcopy(teacher)
    names = ["layer2.0"]
    t_out = {"layer2.0": torch.randn(4, 32, 4, 4)}
    gates = nn.ModuleList([TeacherGate(32)])
    with torch.no_grad():
        gates[0].fc2.bias.fill_(-1.0)  # g = 2 * sigmoid(-1) ~ 0.54 on every channel
        plain_tap = _StudentTap(student, names, t_out, None)
        try:
            plain = student(x)
        finally:
            plain_tap.close()
        gated_tap = _StudentTap(student, names, t_out, gates)
        try:
            gated = student(x)
        finally:
            gated_tap.close()
    assert _hooks(student) == 0
    assert torch.equal(gated_tap.out["layer2.0"], plain_tap.out["layer2.0"])  # loss sees raw s
    assert not torch.allclose(gated, plain, atol=1e-4)  # downstream blocks saw s * g


# ----------------------------------------------------------------------------- training


def test_arch_distill_lowers_kl_and_leaves_no_trace(
    teacher: nn.Module, images: torch.Tensor
) -> None:
    student = _student(teacher)
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        t_logits = teacher(images)
        kl_before = kd_kl(student(images), t_logits).item()

    cfg = ArchDistillConfig(epochs_per_stage=0.5, global_epochs=2, batch_size=16, lr=3e-3, shift=1)
    steps: list[float] = []
    history = arch_distill(student, teacher, images, NAMES, cfg, seed=0, on_step=steps.append)

    with torch.no_grad():
        kl_after = kd_kl(student(images), t_logits).item()
    assert kl_before > 0.3  # the fresh block really changes the predictions
    assert kl_after < 0.75 * kl_before
    assert history["global"][-1] < history["global"][0]
    assert len(history["progressive"]) == len(NAMES) and len(history["global"]) == 2
    assert len(steps) == total_steps(len(images), len(NAMES), cfg)
    assert all(v > 0 for v in steps)
    # adapters and gates are gone: same keys and shapes, no hooks, eval mode
    assert {k: v.shape for k, v in student.state_dict().items()} == shapes
    assert _hooks(student) == 0 and _hooks(teacher) == 0
    assert not student.training
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize(
    "switches",
    [
        {"teacher_attention": False},
        {"residual_adaptation": False},
        {"progressive": False},
        {"teacher_attention": False, "residual_adaptation": False, "progressive": False},
    ],
)
def test_ablations_run(teacher: nn.Module, images: torch.Tensor, switches: dict) -> None:
    student = _student(teacher)
    keys = list(student.state_dict())
    cfg = ArchDistillConfig(**{**FAST.__dict__, **switches})
    steps: list[float] = []
    history = arch_distill(student, teacher, images, NAMES, cfg, seed=0, on_step=steps.append)
    stages = len(NAMES) if cfg.progressive else 1
    assert len(history["progressive"]) == stages
    assert len(steps) == total_steps(len(images), len(NAMES), cfg)
    assert all(math.isfinite(v) for v in history["progressive"] + history["global"])
    assert list(student.state_dict()) == keys
    assert _hooks(student) == 0 and _hooks(teacher) == 0
    assert not student.training


def test_arch_distill_is_deterministic(teacher: nn.Module, images: torch.Tensor) -> None:
    base = _student(teacher)
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    few = images[:32]
    ha = arch_distill(a, teacher, few, NAMES, FAST, seed=3)
    hb = arch_distill(b, teacher, few, NAMES, FAST, seed=3)
    arch_distill(c, teacher, few, NAMES, FAST, seed=4)
    assert ha == hb
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), base.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_mismatched_block_shape_is_rejected(teacher: nn.Module, images: torch.Tensor) -> None:
    student = copy.deepcopy(teacher)  # layer1.0 now doubles the resolution, layer1.1 undoes it
    student.layer1[0] = nn.Sequential(BasicBlock(16, 16), nn.Upsample(scale_factor=2.0))
    student.layer1[1] = nn.Sequential(nn.MaxPool2d(2), BasicBlock(16, 16))
    with pytest.raises(ValueError, match="layer1.0"):
        arch_distill(student, teacher, images[:16], ["layer1.0"], FAST, seed=0)
    assert _hooks(student) == 0 and _hooks(teacher) == 0
