"""Assembling a student from the teacher and fine-tuning it against the teacher's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from archnet.blocks import BlockSpec, find_blocks
from archnet.candidates import build_candidate
from archnet.data import digits
from archnet.distill.finetune import FinetuneConfig, assemble, finetune, random_shift
from archnet.distill.losses import kd_kl
from tests.distill import calibrated_tiny_resnet

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits(size=16).images[:128]


@pytest.fixture(scope="module")
def teacher(images: torch.Tensor) -> nn.Module:
    return calibrated_tiny_resnet(images)


@pytest.fixture(scope="module")
def specs(teacher: nn.Module) -> list[BlockSpec]:
    return find_blocks(teacher, SHAPE)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_assemble_swaps_by_name_without_touching_teacher(teacher: nn.Module, specs) -> None:
    spec = specs[2]  # layer2.0, a down-sampling block
    original_block = teacher.get_submodule(spec.name)
    before = _state(teacher)
    replacement = build_candidate("mbconv_k3_e3_relu", spec)
    student = assemble(teacher, {spec.name: replacement, specs[5].name: nn.Identity()})

    assert teacher.get_submodule(spec.name) is original_block
    placed = student.get_submodule(spec.name)
    assert type(placed) is type(replacement) and placed is not replacement  # a copy
    assert isinstance(student.get_submodule(specs[5].name), nn.Identity)
    assert type(student.get_submodule(specs[1].name)) is type(teacher.get_submodule(specs[1].name))
    assert not student.training

    # nothing is shared: changing the student leaves the teacher and the replacement alone
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(
        not torch.equal(p, q)
        for p, q in zip(replacement.parameters(), placed.parameters(), strict=True)
    )

    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert student(x).shape == teacher(x).shape


def test_finetune_lowers_kl_to_teacher(teacher: nn.Module, specs, images: torch.Tensor) -> None:
    spec = specs[2]
    torch.manual_seed(0)
    student = assemble(teacher, {spec.name: build_candidate("mbconv_k3_e3_relu", spec)})
    teacher_before = _state(teacher)
    with torch.no_grad():
        t_logits = teacher(images)
        kl_before = kd_kl(student(images), t_logits).item()

    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=3e-3, shift=1, feature_weight=0.5)
    steps: list[float] = []
    history = finetune(
        student, teacher, images, cfg, feature_names=[spec.name], seed=0, on_step=steps.append
    )

    with torch.no_grad():
        kl_after = kd_kl(student(images), t_logits).item()
    assert kl_before > 0.3  # the fresh block really changes the predictions
    assert kl_after < 0.75 * kl_before
    assert len(history) == cfg.epochs and len(steps) == cfg.epochs * len(images) // 16
    assert all(v > 0 for v in steps)
    assert not student.training
    assert _hooks(student) == 0 and _hooks(teacher) == 0  # feature taps removed
    after = teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in after)  # teacher untouched


def test_finetune_is_deterministic(teacher: nn.Module, specs, images: torch.Tensor) -> None:
    spec = specs[3]
    torch.manual_seed(0)
    base = assemble(teacher, {spec.name: build_candidate("skip", spec)})
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=1e-3)
    few = images[:32]
    assert finetune(a, teacher, few, cfg, seed=3) == finetune(b, teacher, few, cfg, seed=3)
    assert any(
        not torch.equal(p, q) for p, q in zip(a.parameters(), base.parameters(), strict=True)
    )
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


# ----------------------------------------------------------------------------- random_shift


def test_random_shift_keeps_shape_and_translates() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    crops = {(dy, dx): padded[..., dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)}
    moved = 0
    for _ in range(20):
        y = random_shift(x, 2, gen)
        assert y.shape == x.shape
        match = [k for k, c in crops.items() if torch.equal(y, c)]
        assert len(match) == 1  # one translation, applied to the whole batch
        moved += match[0] != (2, 2)
    assert moved > 0


def test_random_shift_zero_pixels_is_identity() -> None:
    x = torch.randn(4, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert torch.equal(random_shift(x, 0, gen), x)
    assert torch.equal(gen.get_state(), state)  # draws nothing
    flat = torch.randn(4, 10)
    assert random_shift(flat, 2, gen) is flat  # not an image batch


def test_random_shift_is_seeded() -> None:
    x = torch.randn(2, 3, 8, 8)
    a = [random_shift(x, 3, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
