"""Layer conversion to Arch-Net's restricted operators: exact where claimed, close otherwise,
and only allowed ONNX operators/attributes afterwards, on single layers and whole teachers."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import LayerNorm2d as TimmLayerNorm2d
from timm.layers import SelectAdaptivePool2d
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
from torch import nn

from archnet.blocks import find_blocks
from archnet.candidates import build_candidate
from archnet.convstack import ConvStack
from archnet.onnx_utils import check_against_torch, export_onnx
from archnet.opconvert import (
    convert_module,
    convert_modules,
    get_converter,
    register_converter,
)
from archnet.targets import check_model, check_report, load_target
from archnet.zoo import create_model
from archnet.zoo.tiny_effnet import LayerNorm2d as ZooLayerNorm2d

torch.set_num_threads(1)

ARCHNET = load_target("archnet-5op")  # Arch-Net's restricted operators and attribute rules


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def _convert(module: nn.Module) -> nn.Module:
    new = convert_module(module)
    assert new is not None, f"{module} was not converted"
    return new


def _assert_restricted(module: nn.Module, input_shape: tuple[int, ...]) -> None:
    proto = export_onnx(module, input_shape)
    report = check_report(proto, ARCHNET)
    assert report.violations == () and report.unverified == ()
    check_against_torch(module, proto, torch.randn(*input_shape))


# (module, input shape): conversions claimed exact for these inputs
EXACT = {
    "conv1x1": (nn.Conv2d(16, 24, 1), (2, 16, 8, 8)),
    "conv1x1_s2": (nn.Conv2d(16, 24, 1, 2, bias=False), (2, 16, 9, 9)),
    "conv1x3": (nn.Conv2d(8, 8, (1, 3), padding=(0, 1)), (2, 8, 8, 8)),
    "conv2x2_s2": (nn.Conv2d(8, 16, 2, 2), (2, 8, 8, 8)),
    "patchify4": (nn.Conv2d(3, 24, 4, 4), (2, 3, 16, 16)),
    "patchify8": (nn.Conv2d(3, 16, 8, 8, bias=False), (2, 3, 32, 32)),
    "depthwise3": (nn.Conv2d(16, 16, 3, 1, 1, groups=16), (2, 16, 8, 8)),
    "depthwise3_s2": (nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), (2, 16, 9, 9)),
    "grouped3": (nn.Conv2d(16, 32, 3, 1, 1, groups=4), (2, 16, 8, 8)),
    "grouped1x1": (nn.Conv2d(16, 16, 1, groups=2), (2, 16, 8, 8)),
    "stem5_s2": (nn.Conv2d(3, 16, 5, 2, 2, bias=False), (2, 3, 32, 32)),
    "stem5_s2_odd": (nn.Conv2d(3, 16, 5, 2, 2), (2, 3, 33, 31)),
    "stem7_s2": (nn.Conv2d(3, 64, 7, 2, 3, bias=False), (2, 3, 32, 32)),
    "stem5_s1": (nn.Conv2d(3, 32, 5, 1, 2), (2, 3, 16, 16)),
    "fast_avg_pool": (FastAdaptiveAvgPool(flatten=True), (2, 8, 7, 7)),
    "fast_avg_pool_keepdim": (FastAdaptiveAvgPool(flatten=False), (2, 8, 7, 7)),
}


@pytest.mark.parametrize("key", list(EXACT))
def test_exact_conversions(key):
    torch.manual_seed(0)
    module, shape = EXACT[key]
    module = module.eval()
    new = _convert(module).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = module(x)
        torch.testing.assert_close(new(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    _assert_restricted(new, shape)


def _smooth(conv: nn.Conv2d) -> nn.Conv2d:
    """Centre-heavy kernels, the way trained kernels usually look."""
    k = conv.kernel_size[0]
    r = torch.arange(k) - k // 2
    with torch.no_grad():
        conv.weight.mul_(torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (k * k / 8)))
    return conv


def _centre_crop(conv: nn.Conv2d) -> nn.Conv2d:
    """The brief's starting point for a kxk conv: its 3x3 centre (Dirac layers add nothing)."""
    c = (conv.kernel_size[0] - 3) // 2
    crop = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=conv.groups)
    with torch.no_grad():
        crop.weight.copy_(conv.weight[:, :, c : c + 3, c : c + 3])
        crop.bias.copy_(conv.bias)
    return crop


# kxk convs that need a fitted stack: (conv, input shape, expected depth)
STACKS = {
    "stem7_s1": (nn.Conv2d(3, 16, 7, 1, 3), (2, 3, 32, 32), 3),
    "dense5": (nn.Conv2d(32, 32, 5, 1, 2), (2, 32, 16, 16), 2),
    "dense7_s2": (nn.Conv2d(16, 32, 7, 2, 3), (2, 16, 16, 16), 2),
    "depthwise5_s2": (nn.Conv2d(32, 32, 5, 2, 2, groups=32), (2, 32, 16, 16), 2),
    "depthwise7": (nn.Conv2d(16, 16, 7, 1, 3, groups=16), (2, 16, 16, 16), 3),
}


@pytest.mark.parametrize("smooth", [False, True], ids=["random", "smooth"])
@pytest.mark.parametrize("key", list(STACKS))
def test_stacks_beat_the_centre_crop(key, smooth):
    torch.manual_seed(0)
    conv, shape, depth = STACKS[key]
    conv = _smooth(conv) if smooth else conv
    new = _convert(conv)
    assert isinstance(new, ConvStack) and len(new) == depth
    assert [m.stride for m in new] == [conv.stride] + [(1, 1)] * (depth - 1)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = conv(x)
        err, crop_err = _rel_err(new(x), ref), _rel_err(_centre_crop(conv)(x), ref)
    assert err < crop_err
    if smooth:
        assert err < 0.45
    _assert_restricted(new, shape)


ACTS = [
    nn.SiLU(inplace=True),
    nn.GELU(),
    nn.Hardswish(),
    nn.Mish(),
    nn.ELU(),
    nn.LeakyReLU(0.1),
    nn.ReLU6(),
    nn.PReLU(),
    timm.layers.get_act_layer("gelu_tanh")(),
]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_activations_become_relu(act):
    new = _convert(act)
    assert type(new) is nn.ReLU
    assert new.inplace == getattr(act, "inplace", False)
    _assert_restricted(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), new), (1, 4, 8, 8))


# documented as left for the target check to report
NOT_CONVERTED = {
    "sigmoid": nn.Sigmoid(),
    "hardsigmoid": nn.Hardsigmoid(),
    "tanh": nn.Tanh(),
    "layernorm_2d": nn.LayerNorm((4, 8)),  # over two axes: no per-channel counterpart
    "groupnorm": nn.GroupNorm(1, 8),
    "dilated": nn.Conv2d(8, 8, 3, padding=2, dilation=2),
    "stride3": nn.Conv2d(8, 8, 3, 3),
    "reflect_pad": nn.Conv2d(8, 8, 5, padding=2, padding_mode="reflect"),
    "valid_5x5": nn.Conv2d(8, 8, 5, padding=0),
    "conv2d_same": timm.layers.Conv2dSame(8, 8, 5, 2),
    "maxpool3_nopad": nn.MaxPool2d(3, 2),  # one row fewer than a 2x2 pool on even inputs
    "maxpool3_s1": nn.MaxPool2d(3, 1, 1),
    "avgpool3_s1": nn.AvgPool2d(3, 1, 1),
    "adaptive2": nn.AdaptiveAvgPool2d(2),
}


@pytest.mark.parametrize("key", list(NOT_CONVERTED))
def test_not_converted(key):
    assert convert_module(NOT_CONVERTED[key]) is None


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, 2, 1),
        nn.MaxPool2d(2, 2),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Linear(8, 4),
    ],
    ids=lambda m: type(m).__name__,
)
def test_allowed_layers_are_left_alone(module):
    assert convert_module(module) is None


def test_max_pool_keeps_output_size_on_even_inputs():
    pool = nn.MaxPool2d(3, 2, 1)
    new = _convert(pool)
    assert (new.kernel_size, new.stride, new.padding) == (2, 2, 0)
    for size in (8, 16, 18, 32):
        x = torch.randn(1, 4, size, size)
        assert new(x).shape == pool(x).shape
    _assert_restricted(new, (1, 4, 16, 16))


@pytest.mark.parametrize("k", [2, 4])
def test_avg_pool_becomes_max_pools(k):
    pool = nn.AvgPool2d(k)
    new = _convert(pool)
    pools = list(new) if isinstance(new, nn.Sequential) else [new]
    assert len(pools) == k // 2 and all(isinstance(p, nn.MaxPool2d) for p in pools)
    x = torch.randn(1, 4, 16, 16)
    assert new(x).shape == pool(x).shape
    _assert_restricted(new, (1, 4, 16, 16))


@pytest.mark.parametrize("cls", [ZooLayerNorm2d, TimmLayerNorm2d])
def test_layernorm2d_becomes_batchnorm(cls):
    torch.manual_seed(0)
    norm = cls(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    new = _convert(norm)
    assert type(new) is nn.BatchNorm2d and new.eps == 1e-6
    torch.testing.assert_close(new.weight, norm.weight)
    torch.testing.assert_close(new.bias, norm.bias)
    _assert_restricted(new, (1, 8, 4, 4))


def test_select_adaptive_avg_pool_exports_to_global_average_pool():
    """timm's 'avg' pooling is AdaptiveAvgPool2d + Flatten already: nothing to convert."""
    pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
    assert convert_modules(pool) == []
    proto = export_onnx(pool, (1, 8, 4, 4))
    assert [n.op_type for n in proto.graph.node] == ["GlobalAveragePool", "Flatten"]


def test_select_adaptive_fast_pool_is_converted_inside():
    pool = SelectAdaptivePool2d(pool_type="fast", flatten=True)
    x = torch.randn(2, 8, 5, 5)
    ref = pool(x)
    assert convert_modules(pool) == [("pool", "FastAdaptiveAvgPool", "AdaptiveAvgPool2d + Flatten")]
    torch.testing.assert_close(pool(x), ref)
    _assert_restricted(pool, (1, 8, 4, 4))


def test_batchnorm_act_keeps_bn_and_converts_act():
    norm = timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU).eval()
    assert convert_modules(norm) == [("act", "SiLU", "ReLU")]
    proto = export_onnx(norm, (1, 8, 4, 4))
    assert check_model(proto, ARCHNET) == []
    assert [n.op_type for n in proto.graph.node if n.op_type != "Identity"] == [
        "BatchNormalization",
        "Relu",
    ]


def test_conversion_keeps_dtype_mode_and_frozen_weights():
    conv = nn.Conv2d(4, 8, 1).double().eval().requires_grad_(False)
    new = _convert(conv)
    assert new.weight.dtype == torch.float64 and not new.training
    assert not any(p.requires_grad for p in new.parameters())


def test_converters_match_exact_types_and_names():
    class MyConv(nn.Conv2d):  # a subclass may change forward: never converted implicitly
        pass

    assert get_converter(nn.Conv2d(4, 4, 1)) is not None
    assert get_converter(MyConv(4, 4, 1)) is None
    assert get_converter(ZooLayerNorm2d(4)) is get_converter(TimmLayerNorm2d(4))

    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    register_converter(Swish)(lambda m: nn.ReLU())
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), Swish())
        assert convert_modules(model) == [("1", "Swish", "ReLU")]
    finally:
        from archnet import opconvert

        del opconvert._converters[Swish]


def test_unconverted_layers_break_archnet_5op():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 5, padding=2),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.MaxPool2d(3, 2, 1),
        nn.Sigmoid(),
    )
    found = {
        (v.module, v.op_type, v.attribute)
        for v in check_model(export_onnx(model, (1, 4, 16, 16)), ARCHNET)
    }
    assert found == {
        ("0", "Conv", "kernel_shape=[5, 5]"),
        ("1", "Conv", "group=2"),
        ("2", "MaxPool", "kernel_shape=[3, 3]"),
        ("3", "Sigmoid", None),
    }


# --- whole teachers --------------------------------------------------------------------------
def _teacher(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("tiny_"):
        return create_model(name).eval()
    return timm.create_model(name, num_classes=10).eval()


@pytest.mark.parametrize(
    "name, input_shape, expected",
    [
        ("tiny_resnet", (3, 32, 32), {"conv1": "Conv2d 7x7", "maxpool": "MaxPool2d 3x3 s2"}),
        (
            "tiny_effnet",
            (3, 32, 32),
            {
                "conv_stem": "Conv2d 5x5 s2",
                "act1": "SiLU",
                "conv_head": "Conv2d 1x1",
                "act2": "SiLU",
            },
        ),
        ("resnet18", (3, 64, 64), {"conv1": "Conv2d 7x7 s2", "maxpool": "MaxPool2d 3x3 s2"}),
        ("convnext_atto", (3, 64, 64), {"stem.0": "Conv2d 4x4 s4", "stem.1": "LayerNorm2d"}),
    ],
)
def test_convert_teacher_shell(name, input_shape, expected):
    model = _teacher(name)
    specs = find_blocks(model, input_shape)
    names = [s.name for s in specs]
    blocks = {n: model.get_submodule(n) for n in names}
    rows = convert_modules(model, names)
    was = {n: old for n, old, _ in rows}
    assert {n: was[n] for n in expected} == expected
    assert not any(n == b or n.startswith(b + ".") for n, *_ in rows for b in names)
    assert all(model.get_submodule(n) is m for n, m in blocks.items())  # blocks untouched
    assert convert_modules(model, names) == []  # nothing left to do

    for spec in specs:
        model.set_submodule(spec.name, build_candidate("archnet_conv", spec))
    shape = (1, *input_shape)
    proto = export_onnx(model, shape)
    assert check_model(proto, ARCHNET) == []
    assert {n.op_type for n in proto.graph.node} <= {
        "Conv",
        "MaxPool",
        "BatchNormalization",
        "Relu",
        "Gemm",
        "Flatten",
        "GlobalAveragePool",
        "Identity",  # aliases of equal initializers, removed by compilers (the check skips them)
    }
    check_against_torch(model, proto, torch.randn(*shape))


def test_convert_resnet_stem_stays_close():
    """Exact 7x7/2 stem factorisation; only the 3x3 -> 2x2 max-pool changes the stem output."""
    model = _teacher("resnet18")

    def stem(x: torch.Tensor) -> torch.Tensor:
        return model.act1(model.bn1(model.conv1(x)))

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = stem(x)
        rows = convert_modules(model)
        assert rows[0] == ("conv1", "Conv2d 7x7 s2", "Conv2d 3x3 s2 + Conv2d 3x3")
        torch.testing.assert_close(stem(x), ref, rtol=1e-4, atol=1e-4)
