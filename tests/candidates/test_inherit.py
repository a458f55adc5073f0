"""Weight inheritance: exact when structures match, sensible slices when they do not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.candidates import build_candidate, get_candidate, inherit_weights, list_candidates

SPEC = BlockSpec("down", (16, 16, 16), (24, 8, 8))


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BN statistics so nothing matches by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module


# every candidate built from shapes alone for an NCHW block (those cut from a teacher block
# are checked in test_transformer)
SHAPE_BUILT = [
    n
    for n in list_candidates()
    if "nchw" in get_candidate(n).layouts and not get_candidate(n).from_teacher
]


@pytest.mark.parametrize("name", SHAPE_BUILT)
def test_same_structure_is_exact_copy(name):
    torch.manual_seed(0)
    teacher = _randomize(build_candidate(name, SPEC), 0).eval()
    torch.manual_seed(1)
    student = _randomize(build_candidate(name, SPEC), 1).eval()
    n = inherit_weights(student, teacher)
    assert n == len(student.state_dict())  # every tensor of a plain conv/BN module
    x = torch.randn(2, *SPEC.in_shape)
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)
    for k, v in student.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k]), k


def test_build_candidate_with_teacher_inherits():
    torch.manual_seed(0)
    teacher = _randomize(build_candidate("resnet_basic", SPEC), 3).eval()
    torch.manual_seed(1)
    student = build_candidate("resnet_basic", SPEC, teacher).eval()
    x = torch.randn(1, *SPEC.in_shape)
    torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)


def test_smaller_kernel_takes_centre_crop():
    teacher = nn.Conv2d(16, 32, 5, bias=True)
    student = nn.Conv2d(8, 24, 3, bias=True)
    assert inherit_weights(student, teacher) == 2
    assert torch.equal(student.weight, teacher.weight[:24, :8, 1:4, 1:4])
    assert torch.equal(student.bias, teacher.bias[:24])


def test_larger_kernel_is_centred_with_zero_border():
    teacher = nn.Conv2d(4, 4, 3, bias=False)
    student = nn.Conv2d(6, 6, 5, bias=False)
    before = student.weight.detach().clone()
    inherit_weights(student, teacher)
    w = student.weight.detach()
    assert torch.equal(w[:4, :4, 1:4, 1:4], teacher.weight)
    border = torch.ones(5, 5, dtype=torch.bool)
    border[1:4, 1:4] = False
    assert (w[:4, :4][..., border] == 0).all()
    assert torch.equal(w[4:], before[4:]) and torch.equal(w[:, 4:], before[:, 4:])


def test_depthwise_pairs_with_depthwise():
    teacher = nn.Sequential(
        nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.Conv2d(8, 8, 1, bias=False)
    )
    student = nn.Sequential(
        nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 8, 5, groups=8, bias=False)
    )
    assert inherit_weights(student, teacher) == 2
    assert torch.equal(student[0].weight, teacher[1].weight)
    assert torch.equal(student[1].weight[:, :, 1:4, 1:4], teacher[0].weight)


def test_bn_follows_its_conv():
    # Teacher: dense conv + BN(8), depthwise conv + BN(8). Student has only the depthwise part,
    # so its BN must take the teacher's second BN, not the first.
    teacher = nn.Sequential(
        nn.Conv2d(8, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
    )
    _randomize(teacher, 0)
    student = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6))
    assert inherit_weights(student, teacher) == 6  # conv weight + BN (4 tensors + counter)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(student[1], attr), getattr(teacher[3], attr)[:6]), attr


def test_linear_prefix_and_mismatched_layers_skipped():
    teacher = nn.Sequential(nn.Linear(10, 6), nn.Conv2d(3, 3, 1, bias=False))
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm2d(3))
    before = student[1].running_mean.clone()
    assert inherit_weights(student, teacher) == 2
    assert torch.equal(student[0].weight[:6, :4], teacher[0].weight[:, :4])
    assert torch.equal(student[0].bias[:6], teacher[0].bias)
    assert torch.equal(student[1].running_mean, before)


def test_se_gates_do_not_steal_main_convs():
    spec = BlockSpec("same", (16, 16, 16), (16, 16, 16))
    teacher = build_candidate("mbconv_k3_e3_relu", spec)
    student = build_candidate("mbconv_k3_e3_se_relu", spec)
    inherit_weights(student, teacher)
    assert torch.equal(student.conv_pw.conv.weight, teacher.conv_pw.conv.weight)
    assert torch.equal(student.conv_pwl.conv.weight, teacher.conv_pwl.conv.weight)


def test_timm_resnet_block_transfers_exactly():
    timm_resnet = pytest.importorskip("timm.models.resnet")
    downsample = nn.Sequential(nn.Conv2d(16, 24, 1, stride=2, bias=False), nn.BatchNorm2d(24))
    torch.manual_seed(0)
    teacher = _randomize(timm_resnet.BasicBlock(16, 24, stride=2, downsample=downsample), 5)
    student = build_candidate("resnet_basic", SPEC, teacher).eval()
    teacher.eval()
    x = torch.randn(2, *SPEC.in_shape)
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)
