"""Arch-Net candidates: only restricted operators in ONNX, and identity-like at init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.candidates import build_candidate, get_candidate, list_candidates
from archnet.candidates.archnet import ArchConcatBlock, split_stride
from archnet.onnx_utils import export_onnx
from archnet.targets import check_model, load_target

# the convolutional Arch-Net candidates (the archnet_tf* ones serve tokens: test_transformer.py)
# built from the spec alone (archnet_teacher needs the teacher's block: tests/candidates/test_kept)
NAMES = [
    n
    for n in list_candidates("archnet_*")
    if "nchw" in get_candidate(n).layouts and not get_candidate(n).from_teacher
]
SPECS = [
    BlockSpec("same", (16, 16, 16), (16, 16, 16)),
    BlockSpec("down", (16, 16, 16), (24, 8, 8)),
    BlockSpec("down_widen", (24, 8, 8), (40, 4, 4)),
    BlockSpec("s4", (16, 16, 16), (32, 4, 4)),
]

torch.set_num_threads(1)


def test_family_registered():
    required = ["archnet_conv", "archnet_conv_d2", "archnet_concat", "archnet_concat_w05"]
    assert set(required + ["archnet_concat_d2"]) <= set(NAMES)
    for name in NAMES:
        cdef = get_candidate(name)
        assert cdef.family == "archnet"
        assert {"archnet", "restricted"} <= cdef.tags
    assert set(NAMES) <= set(list_candidates(tags={"restricted"}))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("name", NAMES)
def test_exports_only_restricted_ops(name, spec):
    model = build_candidate(name, spec)
    proto = export_onnx(model, (1, *spec.in_shape))
    assert check_model(proto, load_target("archnet-5op")) == []
    ops = {n.op_type for n in proto.graph.node}
    assert "Conv" in ops
    if name.startswith("archnet_concat"):
        assert "Concat" in ops
        assert ("MaxPool" in ops) == (spec.stride > 1)


@pytest.mark.parametrize("name", NAMES)
def test_odd_stride_keeps_shape_but_is_reported(name):
    """Stride 3 cannot be built from stride-2 steps: the shape still matches, and the
    stride-3 conv is what the operator check reports."""
    spec = BlockSpec("s3", (8, 12, 12), (8, 4, 4))
    model = build_candidate(name, spec).eval()
    assert model(torch.randn(1, *spec.in_shape)).shape == (1, *spec.out_shape)
    problems = check_model(export_onnx(model, (1, *spec.in_shape)), load_target("archnet-5op"))
    assert problems and all(
        "strides=[3, 3]" in p.reason or p.op_type == "MaxPool" for p in problems
    )


def test_split_stride():
    assert [split_stride(s) for s in (1, 2, 3, 4, 6, 8, 12)] == [
        (0, 1),
        (1, 1),
        (0, 3),
        (2, 1),
        (1, 3),
        (3, 1),
        (2, 3),
    ]


@pytest.mark.parametrize("name", ["archnet_concat", "archnet_concat_w05", "archnet_concat_d2"])
def test_concat_starts_as_identity(name):
    spec = SPECS[0]
    model = build_candidate(name, spec).eval()
    x = torch.randn(2, *spec.in_shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x, rtol=0, atol=1e-4)


def test_concat_downsampling_starts_as_max_pool():
    spec = BlockSpec("s2_same_ch", (16, 16, 16), (16, 8, 8))
    model = build_candidate("archnet_concat", spec).eval()
    x = torch.randn(2, *spec.in_shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), nn.functional.max_pool2d(x, 2), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_output_can_be_negative(name):
    """Blocks end in conv + BN: like a teacher block's pre-activation output, not ReLU'd."""
    torch.manual_seed(0)
    spec = SPECS[1]
    model = build_candidate(name, spec).train()
    assert (model(torch.randn(4, *spec.in_shape)) < 0).any()


def test_concat_inherits_teacher_last_conv_on_h_channels():
    """``h`` comes first in the concatenation, so a residual teacher's second conv (which
    reads its hidden features) lands on ``h``'s channels and the shortcut Dirac survives."""
    spec = SPECS[0]
    torch.manual_seed(0)
    teacher = build_candidate("resnet_basic", spec)
    student = build_candidate("archnet_concat", spec, teacher)
    assert isinstance(student, ArchConcatBlock)
    mid = student.fuse.conv.in_channels - spec.in_ch
    torch.testing.assert_close(student.h.conv.weight, teacher.conv1.conv.weight)
    torch.testing.assert_close(student.fuse.conv.weight[:, :mid], teacher.conv2.conv.weight)
    eye = torch.zeros(spec.out_ch, spec.in_ch, 3, 3)
    nn.init.dirac_(eye)
    torch.testing.assert_close(student.fuse.conv.weight[:, mid:], eye)
