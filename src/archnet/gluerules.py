"""The built-in exact glue rules (registered with :func:`archnet.glue.register_glue`).

Every replacement is a frozen 3x3 convolution (or a stack of them), Flatten or Reshape, so
it runs on ``archnet-5op``; all hold one-hot or power-of-two taps, and select or sum:

=====================================  =====================================================
glue                                   replacement
=====================================  =====================================================
``a + b``, ``a - b`` (same shapes)      one conv over ``cat([a, b])``: +-identity centre taps
``x * c``, ``x / c``, ``x + c``,        one conv: diagonal centre taps ``c`` (per channel or
``x - c``, ``-x`` (c constant)          scalar), the shift in its bias
channel chunk / split / slice,         one-hot "picker" conv per result (stride 2 for a
shuffle, pixel-unshuffle, any chain    space-to-depth); a flatten chain -> ``nn.Flatten``,
of view / permute / getitem that       another reshape -> a constant-shape Reshape, a no-op
moves elements                         chain -> nothing (checked element by element)
``F.pad`` / ``ZeroPad2d`` (zeros,      one conv, identity tap off centre, larger padding
even total per axis, sides within 2)
``F.avg_pool2d`` / ``AvgPool2d``       n stride-2 convs with 1/4 taps (sizes divisible by
2^n x 2^n, stride 2^n                  2^n, else left to the approximate converter)
=====================================  =====================================================
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from archnet.glue import Replacement, Site, register_glue

__all__ = ["ChannelAffine", "Reshape", "TensorSum", "pad_conv", "picker", "pool_convs"]


def _frozen_conv(in_ch: int, out_ch: int, stride: int = 1, padding=1, bias=False) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, stride, padding, bias=bias).requires_grad_(False)
    conv.weight.zero_()
    if bias:
        conv.bias.zero_()
    return conv


class TensorSum(nn.Module):
    """``a + alpha * b`` as one 3x3 conv over the two concatenated (Add is not allowed)."""

    def __init__(self, channels: int, alpha: float) -> None:
        super().__init__()
        self.conv = _frozen_conv(2 * channels, channels)
        for c in range(channels):
            self.conv.weight[c, c, 1, 1] = 1.0
            self.conv.weight[c, channels + c, 1, 1] = alpha
        self.summary = "Conv2d 3x3 over Concat (identity centre taps)"

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.conv(torch.cat([a, b], dim=1))


class ChannelAffine(nn.Sequential):
    """``x * scale + shift`` per channel: one conv with diagonal centre taps and a bias."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        conv = _frozen_conv(len(scale), len(scale), bias=True)
        idx = torch.arange(len(scale))
        conv.weight[idx, idx, 1, 1] = scale.to(conv.weight.dtype)
        conv.bias.copy_(shift)
        super().__init__(conv)
        self.summary = "Conv2d 3x3, diagonal centre taps"


class Reshape(nn.Module):
    """``x.reshape(-1, *shape)``: a constant shape, so ONNX Reshape without Shape/Gather."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, *self.shape)


def picker(channels: int, taps: list[tuple[int, int, int]], stride: int) -> nn.Conv2d:
    """Output channel k = input channel ``taps[k][0]`` at offset ``taps[k][1:]`` of each
    stride x stride cell (a 3x3 conv, padding 1, tap (1 + dy, 1 + dx))."""
    conv = _frozen_conv(channels, len(taps), stride)
    for k, (c, dy, dx) in enumerate(taps):
        conv.weight[k, c, 1 + dy, 1 + dx] = 1.0
    conv.summary = f"Conv2d 3x3{' s2' if stride == 2 else ''}, one-hot taps"
    return conv


def _selection(probe: Tensor, out: Tensor) -> nn.Module | None:
    """The layer that maps ``probe`` (N, C, H, W of distinct values) to ``out`` by moving
    elements only, or None: each candidate is checked against ``out`` element by element."""
    n, c, h, w = probe.shape
    if out.dim() == 4 and out.shape[0] == n:
        if out.shape == probe.shape and torch.equal(out, probe):
            return nn.Identity()
        ho, wo = out.shape[2:]
        stride = 1 if (ho, wo) == (h, w) else 2
        if stride == 2 and not (h % 2 == 0 == w % 2 and (ho, wo) == (h // 2, w // 2)):
            return None
        taps = []
        for k in range(out.shape[1]):
            i = int(out[0, k, 0, 0])
            ci, y, x = (i // (h * w)) % c, (i // w) % h, i % w
            if i >= c * h * w or y >= stride or x >= stride:
                return None
            if not torch.equal(out[:, k], probe[:, ci, y::stride, x::stride]):
                return None
            taps.append((ci, y, x))
        return picker(c, taps, stride)
    if out.shape[0] != n or out.numel() != probe.numel():
        return None
    if out.dim() == 2 and torch.equal(out, probe.flatten(1)):
        return nn.Flatten(1)
    return Reshape(out.shape[1:]) if torch.equal(out, probe.reshape(out.shape)) else None


# --- two tensors summed, a tensor and a constant ------------------------------------------------
def _per_channel(value: Tensor | float, shape: tuple[int, ...]) -> Tensor | None:
    """A constant that broadcasts against (N, C, H, W) as one value per channel, as (C,)."""
    value = torch.as_tensor(value, dtype=torch.float64)
    try:
        if torch.broadcast_shapes(value.shape, shape) != torch.Size(shape):
            return None
    except RuntimeError:
        return None
    full = value.expand(1, *shape[1:])
    vec = full[0, :, 0, 0]
    return vec if torch.equal(full, vec.view(1, -1, 1, 1).expand_as(full)) else None


def _affine(site: Site, x, scale, shift, was: str) -> Replacement | None:
    shape = site.image(x)
    if shape is None or scale is None or shift is None:
        return None
    scale, shift = _per_channel(scale, shape), _per_channel(shift, shape)
    if scale is None or shift is None:
        return None
    return Replacement(ChannelAffine(scale, shift), (x,), was)


def _operands(site: Site):
    node = site.node
    a = node.args[0] if node.args else node.kwargs.get("input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return a, b, node.kwargs.get("alpha", 1)


@register_glue(operator.add, operator.iadd, torch.add, "add", operator.sub, operator.isub)
@register_glue(torch.sub, "sub")
def add_sub(site: Site) -> Replacement | None:
    """Two same-shaped images summed or subtracted; an image plus or minus a constant."""
    a, b, alpha = _operands(site)
    if site.constant(alpha) is None:
        return None
    sign = -1.0 if site.node.target in (operator.sub, operator.isub, torch.sub, "sub") else 1.0
    alpha = sign * float(alpha)
    shape = site.image(a)
    if shape is not None and site.image(b) == shape:
        kind = "Add" if alpha == 1 else "Sub" if alpha == -1 else "Add (scaled)"
        return Replacement(TensorSum(shape[1], alpha), (a, b), f"{kind} of two tensors")
    if shape is not None and (c := site.constant(b)) is not None:
        return _affine(site, a, 1.0, alpha * torch.as_tensor(c), "Add of a constant")
    if site.image(b) is not None and (c := site.constant(a)) is not None and alpha in (1, -1):
        return _affine(site, b, alpha, c, "Add of a constant")
    return None


@register_glue(operator.mul, operator.imul, torch.mul, "mul", operator.truediv, torch.div)
@register_glue("div", operator.neg, torch.neg, "neg")
def mul_div(site: Site) -> Replacement | None:
    """An image scaled by a constant (scalar or per channel), divided by one, or negated."""
    a, b, _ = _operands(site)
    if site.node.target in (operator.neg, torch.neg, "neg"):
        return _affine(site, a, -1.0, 0.0, "Neg")
    if site.node.kwargs.get("rounding_mode") is not None:
        return None
    if site.node.target in (operator.truediv, torch.div, "div"):
        c = site.constant(b)
        return (
            None
            if c is None
            else _affine(site, a, 1 / torch.as_tensor(c), 0.0, "Div by a constant")
        )
    if site.image(a) is not None:
        return _affine(site, a, site.constant(b), 0.0, "Mul by a constant")
    return _affine(site, b, site.constant(a), 0.0, "Mul by a constant")


# --- layout chains ---------------------------------------------------------------------------
LAYOUT_METHODS = (
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "chunk",
    "split", "narrow", "squeeze", "unsqueeze", "index_select", "tensor_split", "swapaxes",
)  # fmt: skip
LAYOUT_FUNCTIONS = (
    torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.chunk, torch.split,
    torch.narrow, torch.squeeze, torch.unsqueeze, torch.index_select, torch.tensor_split,
    torch.channel_shuffle, torch.pixel_unshuffle, F.pixel_unshuffle, operator.getitem,
)  # fmt: skip


def _layout(node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in LAYOUT_METHODS)
        or (node.op == "call_function" and node.target in LAYOUT_FUNCTIONS)
    )


def _tensorish(site: Site, node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and (site.meta(node) is not None or isinstance(meta, (tuple, list)))


@register_glue(*LAYOUT_METHODS, *LAYOUT_FUNCTIONS)
def layout(site: Site) -> Replacement | None:
    """The last node of a chain of layout operations on one image, if its result is a
    selection of that image's elements a picker conv, Flatten or Reshape makes."""
    node = site.node
    if site.meta(node) is None or all(_layout(u) for u in node.users):
        return None  # a tuple, or not the chain's end
    chain, sources, todo = [], set(), [node]
    while todo:
        n = todo.pop()
        if n in chain:
            continue
        chain.append(n)
        for a in n.all_input_nodes:
            if _tensorish(site, a):  # sizes are evaluated, not followed
                todo.append(a) if _layout(a) else sources.add(a)
    if len(sources) != 1:
        return None
    source = sources.pop()
    shape = site.image(source)
    trivial = all(n.target in ("contiguous", "flatten", torch.flatten) for n in chain)
    if shape is None or (trivial and len(chain) == 1):
        return None
    probe = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    try:
        out = site.evaluate(node, {source: probe})
    except Exception:  # noqa: BLE001 - a value the chain needs is not known here
        return None
    new = _selection(probe, out) if isinstance(out, Tensor) else None
    if new is None or (isinstance(new, nn.Flatten) and trivial):
        return None
    names = "/".join(dict.fromkeys(getattr(n.target, "__name__", str(n.target)) for n in chain))
    return Replacement(new, (source,), f"{names} (moves elements only)")


@register_glue(nn.ChannelShuffle, nn.PixelUnshuffle)
def shuffle_layer(module: nn.Module, shape: tuple[int, ...]) -> nn.Module | None:
    probe = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    return _selection(probe, module(probe)) if len(shape) == 4 else None


# --- padding and pooling ---------------------------------------------------------------------
def pad_conv(channels: int, pads: tuple[int, int, int, int]) -> nn.Conv2d | None:
    """Zero padding (left, right, top, bottom) as one conv: padding ``P = (t + b) / 2 + 1``
    on each side and the identity tap ``P - t`` rows down (``P - l`` columns right); needs
    an even total and sides within 2 of each other, per axis."""
    left, right, top, bottom = pads
    if min(pads) < 0 or (top + bottom) % 2 or (left + right) % 2:
        return None
    py, px = (top + bottom) // 2 + 1, (left + right) // 2 + 1
    ty, tx = py - top, px - left
    if not (0 <= ty <= 2 and 0 <= tx <= 2):
        return None
    conv = _frozen_conv(channels, channels, padding=(py, px))
    idx = torch.arange(channels)
    conv.weight[idx, idx, ty, tx] = 1.0
    conv.summary = f"Conv2d 3x3 padding {(py, px)}, identity tap"
    return conv


@register_glue(F.pad)
def pad(site: Site) -> Replacement | None:
    node = site.node
    x, pads = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    pads = [site.constant(p) for p in pads] if isinstance(pads, (tuple, list)) else [None]
    shape = site.image(x)
    if shape is None or mode != "constant" or value not in (None, 0, 0.0) or None in pads:
        return None
    pads = [int(p) for p in pads] + [0] * (4 - len(pads))
    if any(pads[4:]):
        return None
    conv = pad_conv(shape[1], tuple(pads[:4]))
    return None if conv is None else Replacement(conv, (x,), f"Pad {tuple(pads[:4])}")


@register_glue(nn.ZeroPad2d, nn.ConstantPad2d)
def pad_layer(module: nn.Module, shape: tuple[int, ...]) -> nn.Module | None:
    if len(shape) != 4 or float(getattr(module, "value", 0.0)) != 0.0:
        return None
    return pad_conv(shape[1], tuple(module.padding))


def pool_convs(channels: int, k: int) -> nn.Module | None:
    """A k x k stride-k average pool (k = 2^n) as n stride-2 convs, each the mean of a 2x2
    cell: taps 1/4 at rows/columns 1..2 of a padding-1 window (exact on sizes divisible by k)."""
    n = int(math.log2(k)) if k > 1 else 0
    if k < 2 or 2**n != k:
        return None
    idx = torch.arange(channels)
    convs = []
    for _ in range(n):
        conv = _frozen_conv(channels, channels, stride=2)
        conv.weight[idx, idx, 1:, 1:] = 0.25
        conv.summary = "Conv2d 3x3 s2, 1/4 taps"
        convs.append(conv)
    return convs[0] if n == 1 else nn.Sequential(*convs)


def _pool_args(k, s, p, shape) -> int | None:
    k, s, p = (v if isinstance(v, (tuple, list)) else (v, v) for v in (k, s or k, p))
    if len(set(k)) != 1 or tuple(s) != tuple(k) or any(p) or shape is None:
        return None
    return k[0] if shape[2] % k[0] == 0 and shape[3] % k[0] == 0 else None


@register_glue(F.avg_pool2d)
def avg_pool(site: Site) -> Replacement | None:
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor")
    given = dict(zip(names, site.node.args[1:]), **site.node.kwargs)
    if given.get("divisor_override") or given.get("divisor"):
        return None
    x = site.node.args[0]
    k = _pool_args(given.get("kernel_size"), given.get("stride"), given.get("padding", 0),
                   site.image(x))  # fmt: skip
    new = None if k is None else pool_convs(site.image(x)[1], k)
    return None if new is None else Replacement(new, (x,), f"AvgPool {k}x{k} s{k}")


@register_glue(nn.AvgPool2d)
def avg_pool_layer(pool: nn.AvgPool2d, shape: tuple[int, ...]) -> nn.Module | None:
    if pool.divisor_override or len(shape) != 4:
        return None
    k = _pool_args(pool.kernel_size, pool.stride, pool.padding, shape)
    return None if k is None else pool_convs(shape[1], k)
