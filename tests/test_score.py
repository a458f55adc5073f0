"""Replace-one-block scoring and rank correlation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from archnet.blocks import BlockSpec, find_blocks
from archnet.candidates import build_candidate
from archnet.score import replace_one_block, spearman, swapped
from archnet.tasks import get_task
from archnet.zoo import create_model

TASK = get_task("classification")

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        model.fc.weight.normal_(0.0, 0.5, generator=gen)
    return model.eval()


@pytest.fixture(scope="module")
def specs(teacher: nn.Module) -> list[BlockSpec]:
    return find_blocks(teacher, SHAPE)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1))


def test_swapped_puts_and_restores(teacher: nn.Module, images) -> None:
    original = teacher.get_submodule("layer2.0")
    stub = build_candidate("skip", BlockSpec("layer2.0", (16, 8, 8), (32, 4, 4)))
    with swapped(teacher, "layer2.0", stub) as model:
        assert model is teacher
        assert teacher.get_submodule("layer2.0") is stub
        with torch.no_grad():
            assert model(images[:2]).shape == (2, 10)
    assert teacher.get_submodule("layer2.0") is original


def test_swapped_restores_when_body_raises(teacher: nn.Module) -> None:
    original = teacher.get_submodule("layer1.1")
    with pytest.raises(RuntimeError, match="boom"), swapped(teacher, "layer1.1", nn.Identity()):
        assert isinstance(teacher.get_submodule("layer1.1"), nn.Identity)
        raise RuntimeError("boom")
    assert teacher.get_submodule("layer1.1") is original


def test_replace_with_own_block_copy_gives_zero_kl(teacher: nn.Module, specs, images) -> None:
    t_logits = TASK.outputs(teacher, images)
    for spec in specs:
        block = teacher.get_submodule(spec.name)
        out = replace_one_block(TASK, teacher, spec.name, copy.deepcopy(block), images, t_logits)
        assert set(out) == {"kl"}
        assert out["kl"] == pytest.approx(0.0, abs=1e-6)
        assert teacher.get_submodule(spec.name) is block


def test_replace_with_random_candidate_gives_positive_kl(teacher: nn.Module, specs, images) -> None:
    t_logits = TASK.outputs(teacher, images)
    spec = specs[2]
    block = teacher.get_submodule(spec.name)
    torch.manual_seed(0)
    candidate = build_candidate("mbconv_k3_e3_relu", spec)
    out = replace_one_block(TASK, teacher, spec.name, candidate, images, t_logits)
    assert out["kl"] > 1e-3
    assert teacher.get_submodule(spec.name) is block
    torch.testing.assert_close(TASK.outputs(teacher, images), t_logits)  # teacher unchanged


def test_replace_one_block_reports_top1(teacher: nn.Module, specs, images) -> None:
    t_logits = TASK.outputs(teacher, images)
    labels = t_logits.argmax(-1)
    spec = specs[1]
    same = copy.deepcopy(teacher.get_submodule(spec.name))
    out = replace_one_block(TASK, teacher, spec.name, same, images, t_logits, images, labels)
    assert out["top1"] == pytest.approx(100.0)
    wrong = (labels + 1) % 10
    out = replace_one_block(TASK, teacher, spec.name, same, images, t_logits, images, wrong)
    assert out["top1"] == pytest.approx(0.0)


def test_spearman() -> None:
    assert spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]) is None
    assert spearman([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]) is None
    assert spearman([1.0, 2.0], [2.0, 1.0]) is None  # too short to rank
    # monotone but non-linear: rank correlation is exactly 1
    assert spearman([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 8.0, 27.0, 64.0, 1000.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    value = spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert value is not None and 0.0 < value < 1.0
