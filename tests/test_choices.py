"""Choices: candidate x bit width names, and building quantized choices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archnet.blocks import find_blocks
from archnet.choices import build_choice, choice_name, parse_choice
from archnet.quant import QuantModule, is_quantized
from archnet.zoo import create_model


@pytest.mark.parametrize(
    ("name", "parsed"),
    [("mbconv_k3_e3_relu", ("mbconv_k3_e3_relu", None)), ("teacher@w4a8", ("teacher", (4, 8)))],
)
def test_names_round_trip(name: str, parsed) -> None:
    assert parse_choice(name) == parsed
    assert choice_name(*parsed) == name


def test_bad_bits_in_a_choice() -> None:
    with pytest.raises(ValueError, match="w<bits>a<bits>"):
        parse_choice("skip@4bit")


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    teacher = create_model("tiny_resnet").eval()
    spec = find_blocks(teacher, (3, 16, 16))[1]
    return spec, teacher.get_submodule(spec.name)


def test_quantized_choice_is_folded_and_close_to_float(block) -> None:
    spec, teacher_block = block
    x = torch.randn(16, *spec.in_shape)
    reference = build_choice("teacher", spec, teacher_block)(x)
    for bits, tolerance in ((8, 0.05), (4, 0.5)):
        q = build_choice(f"teacher@w{bits}a{bits}", spec, teacher_block, calibration=x)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
        assert all(m.weight_bits == bits for m in q.modules() if isinstance(m, QuantModule))
        err = (q(x) - reference).norm() / reference.norm()
        assert err < tolerance, (bits, float(err))


def test_quantized_choice_reloads_from_its_state_dict(block) -> None:
    spec, teacher_block = block
    x = torch.randn(8, *spec.in_shape)
    trained = build_choice("teacher@w4a4", spec, teacher_block, calibration=x.relu())
    fresh = build_choice("teacher@w4a4", spec, teacher_block)
    fresh.load_state_dict(trained.state_dict())
    assert is_quantized(fresh)
    torch.testing.assert_close(fresh(x), trained(x))
