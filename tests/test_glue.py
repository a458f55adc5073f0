"""Exact glue passes: every rewrite computes what the glue it replaces computed (random inputs),
and the rewritten module exports only operators archnet-5op runs."""

from __future__ import annotations

import io
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archnet.glue import legalize_glue, legalize_layers, register_glue
from archnet.onnx_utils import export_onnx
from archnet.opconvert import convert_module
from archnet.targets import check_model, load_target

TARGET = load_target("archnet-5op")


def _legal(module: nn.Module, shape) -> bool:
    return check_model(export_onnx(module.eval(), shape), TARGET) == []


def _glued(module: nn.Module, shape, rows_expected: int | None = None):
    """The module legalized on one random input, checked on another."""
    torch.manual_seed(0)
    module = module.eval()
    new, rows = legalize_glue(module, [], torch.randn(2, *shape[1:]))
    if rows_expected is not None:
        assert len(rows) == rows_expected, rows
    x = torch.randn(3, *shape[1:])  # another batch size: nothing baked in
    return new, rows, x


class Conv(nn.Conv2d):
    """A 3x3 conv archnet-5op runs, with a non-torch class so the glue tests own the forward."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o, 3, padding=1)


class Fn(nn.Module):
    """Glue written as a function of the input, after one allowed conv."""

    def __init__(self, fn, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.fn = fn
        self.register_buffer("gain", torch.rand(channels) + 0.5)

    def forward(self, x):
        return self.fn(self, self.conv(x), x)


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, y, x: y + x,
        lambda m, y, x: y - x,
        lambda m, y, x: torch.add(y, x, alpha=2.0),
        lambda m, y, x: x.sub(y),
    ],
)
def test_two_tensors_summed_become_one_conv_over_their_concat(fn):
    module = Fn(fn)
    new, rows, x = _glued(module, (1, 8, 10, 10), 1)
    assert "two tensors" in rows[0][1]
    torch.testing.assert_close(new(x), module(x), rtol=1e-5, atol=1e-5)
    assert _legal(new, (1, 8, 10, 10)) and not _legal(module, (1, 8, 10, 10))


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, y, x: y * 0.5,
        lambda m, y, x: 3.0 * y - 1.0,
        lambda m, y, x: y / 4.0 + 2.0,
        lambda m, y, x: 1.0 - y,
        lambda m, y, x: -y,
        lambda m, y, x: y * m.gain.view(1, -1, 1, 1),  # per channel, from a buffer
        lambda m, y, x: y.mul(m.gain[None, :, None, None]).div(3),
    ],
)
def test_constant_arithmetic_becomes_a_diagonal_conv(fn):
    module = Fn(fn)
    new, rows, x = _glued(module, (1, 8, 10, 10))
    assert rows and all(r[0].startswith("glue_") for r in rows)
    torch.testing.assert_close(new(x), module(x), rtol=1e-5, atol=1e-5)
    assert _legal(new, (1, 8, 10, 10))


def test_a_product_of_two_tensors_is_left_alone():
    module = Fn(lambda m, y, x: y * x)
    new, rows, _ = _glued(module, (1, 8, 10, 10), 0)
    assert new is module


def _split(m, y, x):
    a, b = torch.split(y, [3, 5], 1)  # unpacked, as fx traces it
    return torch.cat([b, a, x[:, 2:6]], 1)


def _shuffle(m, y, x):
    n, c, h, w = y.shape
    return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, y, x: torch.cat([y.chunk(2, dim=1)[1], y.chunk(2, dim=1)[0]], 1),
        _split,
        lambda m, y, x: torch.cat([y[:, ::2], y.narrow(1, 1, 4)], 1),
        _shuffle,
        lambda m, y, x: torch.channel_shuffle(y, 4),
        lambda m, y, x: F.pixel_unshuffle(y, 2),  # space to depth: stride-2 pickers
        lambda m, y, x: y.view(y.size(0), 4, 2, 10, 10).permute(0, 2, 1, 3, 4).flatten(1, 2),
    ],
)
def test_channel_selections_become_one_hot_convs_bit_exactly(fn):
    module = Fn(fn)
    new, rows, x = _glued(module, (1, 8, 10, 10))
    assert rows
    torch.testing.assert_close(new(x), module(x), rtol=0, atol=0)
    assert _legal(new, (1, 8, 10, 10)) and not _legal(module, (1, 8, 10, 10))


@pytest.mark.parametrize(
    ("fn", "kind"),
    [
        (lambda m, y, x: y.view(y.size(0), -1), nn.Flatten),
        (lambda m, y, x: y.reshape(y.shape[0], y.shape[1] * y.shape[2] * y.shape[3]), nn.Flatten),
        (lambda m, y, x: y.reshape(-1, 8, 100), None),  # a constant-shape Reshape
        (lambda m, y, x: y.view(y.shape).contiguous(), nn.Identity),
    ],
)
def test_reshape_variants_become_the_layout_ops_the_target_runs(fn, kind):
    module = Fn(fn)
    new, rows, x = _glued(module, (1, 8, 10, 10), 1)
    if kind is not None:
        assert isinstance(new.get_submodule(rows[0][0]), kind)
    torch.testing.assert_close(new(x), module(x), rtol=0, atol=0)
    assert _legal(new, (1, 8, 10, 10))


@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 2, 2, 0), (3, 3, 0, 0), (2, 2, 1, 3)])
def test_zero_padding_becomes_a_shifted_identity_conv(pads):
    module = Fn(lambda m, y, x: F.pad(y, pads))
    new, rows, x = _glued(module, (1, 8, 9, 11), 1)
    torch.testing.assert_close(new(x), module(x), rtol=0, atol=0)
    assert _legal(new, (1, 8, 9, 11))
    layer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ZeroPad2d(pads)).eval()
    before = layer(x)
    assert legalize_layers(layer, [], x) and not isinstance(layer[1], nn.ZeroPad2d)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_padding_no_conv_makes_exactly_is_left_for_the_checker():
    module = Fn(lambda m, y, x: F.pad(y, (0, 1, 0, 1)))  # TF 'same' before a stride-2 conv
    assert _glued(module, (1, 8, 10, 10), 0)[0] is module
    ones = Fn(lambda m, y, x: F.pad(y, (1, 1, 1, 1), value=1.0))  # not zeros
    assert _glued(ones, (1, 8, 10, 10), 0)[0] is ones


@pytest.mark.parametrize("k", [2, 4])
def test_average_pooling_over_2n_windows_becomes_quarter_tap_convs(k):
    module = Fn(lambda m, y, x: F.avg_pool2d(y, k))
    new, rows, x = _glued(module, (1, 8, 16, 16), 1)
    torch.testing.assert_close(new(x), module(x), rtol=1e-5, atol=1e-6)
    assert _legal(new, (1, 8, 16, 16)) and not _legal(module, (1, 8, 16, 16))
    layer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.AvgPool2d(k)).eval()
    before = layer(x)
    assert legalize_layers(layer, [], x)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    odd = nn.Sequential(nn.AvgPool2d(k)).eval()  # 14 is not divisible by 4: not exact
    assert (legalize_layers(odd, [], torch.randn(2, 8, 14, 14)) == []) == (k == 4)


@pytest.mark.parametrize(
    ("kernel", "padding"),
    [((1, 3), (0, 0)), ((3, 1), (2, 1)), ((1, 1), (1, 1)), ((1, 7), (0, 3)), ((7, 1), (3, 0))],
)
def test_k_by_1_convs_become_exact_3x3_stacks(kernel, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel, padding=padding).eval()
    new = convert_module(conv)
    x = torch.randn(2, 6, 13, 11)
    torch.testing.assert_close(new(x), conv(x), rtol=1e-5, atol=1e-5)
    assert _legal(new, (1, 6, 13, 11))


class Untraceable(nn.Module):
    """Control flow on a value: fx cannot trace it; its child still gets its own pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Fn(lambda m, y, x: y + x)

    def forward(self, x):
        y = self.inner(x)
        return y if float(y.mean().detach()) > -1e9 else -y


def test_an_untraceable_module_is_kept_and_its_children_are_legalized():
    module = Untraceable()
    new, rows, x = _glued(module, (1, 8, 10, 10), 1)
    assert new is module and rows[0][0] == "inner.glue_add"
    torch.testing.assert_close(new(x), Untraceable.forward(module, x))


class Residual(nn.Module):
    """``conv(x) + x``: a class of its own, so that the legalized model pickles."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


def test_blocks_are_skipped_and_the_module_keeps_its_children():
    torch.manual_seed(0)
    model = nn.Sequential(Residual(), Residual()).eval()
    example = torch.randn(2, 8, 10, 10)
    new, rows = legalize_glue(model, ["1"], example)
    assert [r[0] for r in rows] == ["0.glue_add"]
    assert new[0].conv is model[0].conv and isinstance(new[1], Residual)
    reloaded = torch.load(io.BytesIO(_saved(new)), weights_only=False)  # student.pt: pickled
    torch.testing.assert_close(reloaded(example), model(example))


def _saved(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def test_a_registered_rule_is_used_and_an_approximate_one_is_kept():
    from archnet.glue import Replacement
    from archnet.gluerules import TensorSum

    @register_glue("maximum_like_sum", exact=False)
    def _(site):
        a, b = site.node.args
        return Replacement(TensorSum(site.image(a)[1], 1.0), (a, b), "max of two tensors")

    class Max(nn.Module):
        def forward(self, x):
            return x.maximum_like_sum(torch.relu(x))

    torch.Tensor.maximum_like_sum = torch.Tensor.maximum
    try:
        new, rows = legalize_glue(Max().eval(), [], torch.randn(2, 4, 6, 6))
    finally:
        del torch.Tensor.maximum_like_sum
    assert [r[1] for r in rows] == ["max of two tensors"]  # not exact, yet kept
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(new(x), x + torch.relu(x))


def test_the_plan_judges_each_glue_rewrite():
    from archnet.blocks import find_blocks
    from archnet.plan import plan_conversion
    from tests.test_plan import Block

    torch.manual_seed(0)
    model = nn.Sequential(
        Fn(lambda m, y, x: torch.cat([y[:, 2:], y[:, :2]], 1) + 1.0, channels=3),
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(Block(), Block()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    specs = find_blocks(model, (3, 16, 16), "2.*")
    plan = plan_conversion(model, specs, TARGET, "archnet", (1, 3, 16, 16), count_candidates=False)
    assert plan.ok, plan.left
    glue = {r.module: r.exact for r in plan.rewrites if ".glue_" in r.module}
    assert len(glue) == 3 and all(glue.values()), plan.rewrites


def test_an_inexact_rule_is_dropped():
    @register_glue("sub_like_add")
    def _(site):
        from archnet.glue import Replacement
        from archnet.gluerules import TensorSum

        a, b = site.node.args
        return Replacement(TensorSum(site.image(a)[1], 1.0), (a, b), "claims exact")

    class Sub(nn.Module):
        def forward(self, x):
            return x.sub_like_add(torch.relu(x))

    torch.Tensor.sub_like_add = torch.Tensor.sub
    try:
        new, rows = legalize_glue(Sub().eval(), [], torch.randn(2, 4, 6, 6))
    finally:
        del torch.Tensor.sub_like_add
    assert rows == [] and isinstance(new, Sub)


def test_operator_keys_are_registered():
    from archnet.glue import _node_rules

    for key in (operator.add, torch.sub, "chunk", F.pad, F.avg_pool2d, operator.getitem):
        assert key in _node_rules
