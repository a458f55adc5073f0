"""Layer-level conversion of any network to Arch-Net's restricted operator set.

Arch-Net targets NPUs/ASICs that run only 3x3 dense convolution (stride 1 or 2), 2x2 stride-2
max-pooling, BatchNorm, ReLU, fully connected layers, concatenation, global average pooling
and flatten/reshape. Candidate blocks replace a teacher's blocks; this module converts what
lies outside them (stem, head, glue) layer by layer, starting every replacement from the
teacher's weights so distillation begins close to the teacher:

=====================================  =====================================================
teacher layer                          replacement
=====================================  =====================================================
Conv2d 1x1, 1x3, 3x1 (stride 1 or 2,   3x3 conv, taps centred in the kernel, padding one
any padding)                           more along each short side (exact)
Conv2d 1xk, kx1 'same', stride 1       k // 2 3x3 convs: a partial sum plus the input
                                       carried one step further out to each side per
                                       layer (exact)
Conv2d 2x2 stride 2                    3x3 stride-2 conv, taps in its lower-right 2x2
                                       (exact for even input sizes)
Conv2d kxk stride k, k = 2^n >= 4      n stride-2 3x3 convs moving 2x2 patches to channels,
("patchify" stems)                     the last holding the taps (exact for sizes divisible
                                       by k)
Conv2d kxk, k odd >= 5 (or 1xk, kx1    linear stack of 3x3 convs with the same receptive
stride 2), stride 1 or 2               field, stride on the first (a ``ConvStack``):
                                       exact two-conv patch factorisation for narrow inputs
                                       (stems), else the centre crop + Dirac identities,
                                       least-squares fitted to the whole kernel (close)
grouped / depthwise Conv2d             dense conv with block-diagonal weights (exact for
                                       3x3), then as above for other kernels
SiLU, GELU, Hardswish, Mish, ELU,      ReLU (approximate; the network is distilled
CELU, SELU, LeakyReLU, PReLU, ReLU6    afterwards anyway)
LayerNorm2d (any class of that name)   BatchNorm2d with the affine weights copied; running
                                       statistics start at (0, 1) and must be re-estimated
MaxPool2d kxk stride 2 with the same   MaxPool2d 2x2 stride 2 (approximate)
output size on every even input
AvgPool2d 2^n x 2^n, stride 2^n        n x MaxPool2d 2x2 stride 2 (approximate), where
                                       :mod:`archnet.glue` found no exact conv stack
timm FastAdaptiveAvgPool (NCHW)        AdaptiveAvgPool2d(1) [+ Flatten]: GlobalAveragePool
                                       in ONNX instead of ReduceMean
=====================================  =====================================================

The conv stacks are built in :mod:`archnet.convstack`; exact output-channel splits for targets
with ``max_channels`` are in :mod:`archnet.channelsplit`.

Kept as they are, being allowed already: dense 3x3 convs, MaxPool2d 2x2/2, BatchNorm2d, ReLU,
Linear, Flatten, Dropout, Identity, AdaptiveAvgPool2d(1) (and timm's SelectAdaptivePool2d
'avg', which is built from the last two).

Transformer layers (``nn.LayerNorm``, timm attention, ``nn.Embedding``, a ViT's token pooling)
are converted in :mod:`archnet.tokenconvert`, registered here; exact rewrites of multi-branch
blocks and bias-free Linear layers in :mod:`archnet.legalize`.

Not converted (left in place for a target check to report): Sigmoid, Hardsigmoid, Tanh
(gates have no ReLU counterpart); GroupNorm and norms over several axes; dilated
convs, strides above 2 other than patchify, other even kernels, kxk convs without 'same'
padding, non-zero padding modes, and Conv2d subclasses (timm's Conv2dSame, StdConv2d);
MaxPool2d that would change the output size, other AvgPool2d, adaptive pools other than 1x1
average. Arithmetic in a module's own ``forward`` (a residual Add, a chunk, a pad) is not a
layer: :mod:`archnet.glue` rewrites what it can exactly (not an SE gate's Mul, ``x.mean()``). Converters are looked up by a
module's exact type or class name, never by subclass, because a subclass may override
``forward`` (weight standardisation, dynamic padding) and would silently change meaning.

Whether the result runs on a chip is decided by one checker only: the target's
(``archnet.targets.check``; the ``archnet-5op`` profile holds Arch-Net's operators and rules).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import activations as timm_act
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
from torch import nn

from archnet.convstack import (
    ConvStack,  # noqa: F401 - a student.pt saved before the move loads it from here
    conv3x3,
    conv_bias,
    conv_stack,
    dense_weight,
    line_stack,
    patchify_stack,
    square_kernel,
)

__all__ = [
    "Converter",
    "convert_module",
    "convert_modules",
    "describe",
    "get_converter",
    "get_rewrite",
    "register_converter",
    "register_rewrite",
]

Converter = Callable[[nn.Module], "nn.Module | None"]
_converters: dict[type[nn.Module] | str, Converter] = {}
#: ``rewrite(module) -> rows`` changes a module's own glue in place (its ``forward`` does
#: arithmetic no child layer holds, e.g. a ViT's token pooling); keyed by class name
Rewrite = Callable[[nn.Module], "list[tuple[str, str, str]]"]
_rewrites: dict[str, Rewrite] = {}


def register_converter(*keys: type[nn.Module] | str) -> Callable[[Converter], Converter]:
    """Decorator registering ``converter(module) -> nn.Module | None`` for module types.

    A key is a class (matched exactly) or a class name (matches any class of that name, for
    layers that several libraries define, such as ``LayerNorm2d``). Returning ``None``
    means the module is already allowed or cannot be converted.
    """

    def decorator(converter: Converter) -> Converter:
        for key in keys:
            _converters[key] = converter
        return converter

    return decorator


def register_rewrite(*class_names: str) -> Callable[[Rewrite], Rewrite]:
    """Decorator registering ``rewrite(module) -> [(name, was, now)]`` for classes of these
    names: it edits the module in place (names relative to it) where its glue is not a layer."""

    def decorator(rewrite: Rewrite) -> Rewrite:
        for name in class_names:
            _rewrites[name] = rewrite
        return rewrite

    return decorator


def get_rewrite(module: nn.Module) -> Rewrite | None:
    """The in-place glue rewrite registered for ``module``'s class name, or ``None``."""
    return _rewrites.get(type(module).__name__)


def get_converter(module: nn.Module) -> Converter | None:
    """Converter for ``module``'s exact type, else for its class name, else ``None``."""
    cls = type(module)
    return _converters.get(cls) or _converters.get(cls.__name__)


def _match(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give the replacement the original's device, floating dtype, mode and trainability."""
    ref = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    params = list(old.parameters())
    if params:
        trainable = any(p.requires_grad for p in params)
        for p in new.parameters():
            p.requires_grad_(trainable)
    return new.train(old.training)


def convert_module(module: nn.Module) -> nn.Module | None:
    """A restricted-operator replacement for ``module``, or ``None`` if there is nothing to do
    (already allowed, or no converter applies)."""
    converter = get_converter(module)
    if converter is None:
        return None
    new = converter(module)
    return None if new is None else _match(new, module)


def convert_modules(
    model: nn.Module, names_to_skip: Iterable[str] = ()
) -> list[tuple[str, str, str]]:
    """Swap every convertible module of ``model`` in place; returns (name, was, now) rows.

    The walk is top-down: a converted module is replaced whole and not descended into, an
    unconverted one is searched for convertible children. Modules named in ``names_to_skip``
    (the blocks that candidates will replace) and everything inside them stay untouched. The
    root itself is never swapped; use :func:`convert_module` for a single layer.
    """
    skip = tuple(names_to_skip)
    rows: list[tuple[str, str, str]] = []

    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in skip)

    def rewrite(prefix: str, module: nn.Module) -> None:
        fn = get_rewrite(module)
        for name, was, now in fn(module) if fn else []:  # name "": the module itself
            rows.append((".".join(p for p in (prefix, name) if p), was, now))

    def visit(prefix: str, parent: nn.Module) -> None:
        rewrite(prefix, parent)
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if skipped(name):
                continue
            new = convert_module(child)
            if new is None:
                visit(name, child)
                continue
            setattr(parent, child_name, new)
            rows.append((name, describe(child), describe(new)))

    visit("", model)
    return rows


def describe(module: nn.Module) -> str:
    """Short human-readable kind of a layer, e.g. ``Conv2d 7x7 s2`` or ``MaxPool2d 2x2 s2``."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        text = f"Conv2d {kh}x{kw}"
        text += f" s{module.stride[0]}" if module.stride[0] > 1 else ""
        return text + (f" g{module.groups}" if module.groups > 1 else "")
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        return f"{type(module).__name__} {k[0]}x{k[1]} s{s[0]}"
    if isinstance(module, nn.Sequential):
        return " + ".join(describe(m) for m in module)
    return type(module).__name__


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# --- convolutions (the stacks themselves: :mod:`archnet.convstack`) -------------------------
def _padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Explicit padding of ``conv``; ``None`` for 'same' on even kernels (asymmetric)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        kh, kw = conv.kernel_size
        return (kh // 2, kw // 2) if kh % 2 and kw % 2 else None
    return _pair(conv.padding)


@register_converter(nn.Conv2d)
def _convert_conv(conv: nn.Conv2d) -> nn.Module | None:
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    padding = _padding(conv)
    if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or sh != sw:
        return None
    if kh == kw == sh > 2 and kh & (kh - 1) == 0 and padding == (0, 0):
        return patchify_stack(dense_weight(conv).cpu(), conv_bias(conv))
    if sh > 2:
        return None
    if padding is None or ((kh, kw) == (3, 3) and conv.groups == 1):
        return None
    stride, in_ch, out_ch = sh, conv.in_channels, conv.out_channels
    weight = dense_weight(conv).cpu()
    bias = conv_bias(conv)
    if kh in (1, 3) and kw in (1, 3):  # grouped 3x3 (dense now), 1x1, 1x3, 3x1: any padding
        pad = (padding[0] + (3 - kh) // 2, padding[1] + (3 - kw) // 2)
        kernel = F.pad(weight, ((3 - kw) // 2,) * 2 + ((3 - kh) // 2,) * 2)
        return conv3x3(in_ch, out_ch, kernel, bias, stride, pad)
    if (kh, kw) == (2, 2) and stride == 2 and padding == (0, 0):
        # window 2i..2i+1 is the 3x3 window 2i-1..2i+1 (padding 1) without its first row/col
        return conv3x3(in_ch, out_ch, F.pad(weight, (1, 0, 1, 0)), bias, stride)
    if kh % 2 == 0 or kw % 2 == 0 or padding != (kh // 2, kw // 2):
        return None
    if min(kh, kw) == 1 and stride == 1:
        return line_stack(weight, bias)
    return conv_stack(in_ch, out_ch, square_kernel(weight), bias, stride)


# --- activations, norms, pools ---------------------------------------------------------------
@register_converter(
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ReLU6,
    timm_act.Swish,
    timm_act.GELU,
    timm_act.GELUTanh,
    timm_act.QuickGELU,
    timm_act.HardSwish,
    timm_act.Mish,
    timm_act.HardMish,
    timm_act.PReLU,
)
def _to_relu(act: nn.Module) -> nn.Module:
    """ReLU for every ReLU-like activation: same shape of response, and NPUs run only ReLU."""
    return nn.ReLU(inplace=bool(getattr(act, "inplace", False)))


@register_converter("LayerNorm2d")
def _layernorm2d_to_bn(norm: nn.Module) -> nn.Module | None:
    """Channel LayerNorm -> BatchNorm2d with the same affine map; statistics start at (0, 1)
    and must be re-estimated on data (as the pipeline does after training)."""
    shape = tuple(getattr(norm, "normalized_shape", ()))
    if len(shape) != 1:
        return None
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    bn = nn.BatchNorm2d(shape[0], eps=float(getattr(norm, "eps", 1e-5)), affine=weight is not None)
    if weight is not None:
        with torch.no_grad():
            bn.weight.copy_(weight)
            if bias is not None:
                bn.bias.copy_(bias)
    return bn


def _pool_out(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size along one axis."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # the last window must start inside the input or left padding
    return out


@register_converter(nn.MaxPool2d)
def _convert_maxpool(pool: nn.MaxPool2d) -> nn.Module | None:
    """MaxPool2d 2x2 stride 2 when it gives the same output size on every even input."""
    k, s, p, d = (_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    if (k, s, p) == ((2, 2), (2, 2), (0, 0)) and d == (1, 1) and not pool.ceil_mode:
        return None
    if s != (2, 2) or d != (1, 1) or k[0] != k[1] or p[0] != p[1] or pool.return_indices:
        return None
    if any(_pool_out(h, k[0], 2, p[0], pool.ceil_mode) != h // 2 for h in range(2, 130, 2)):
        return None
    return nn.MaxPool2d(2, 2)


@register_converter(nn.AvgPool2d)
def _convert_avgpool(pool: nn.AvgPool2d) -> nn.Module | None:
    """A 2^n average pool of stride 2^n -> n 2x2 max-pools: same output size, max for mean."""
    k, s, p = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
    n = int(math.log2(k[0])) if k[0] > 1 else 0
    if k[0] != k[1] or s != k or p != (0, 0) or 2**n != k[0] or n == 0:
        return None
    pools = [nn.MaxPool2d(2, 2) for _ in range(n)]
    return pools[0] if n == 1 else nn.Sequential(*pools)


@register_converter(FastAdaptiveAvgPool)
def _convert_fast_avg(pool: FastAdaptiveAvgPool) -> nn.Module | None:
    """timm's ``x.mean((2, 3))`` exports to ReduceMean; AdaptiveAvgPool2d(1) to
    GlobalAveragePool."""
    if tuple(pool.dim) != (2, 3):
        return None  # channels-last input
    gap = nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(gap, nn.Flatten(1)) if pool.flatten else gap


# Transformer conversions register themselves on import; at the end, as they use this module.
from archnet import legalize as _legalize  # noqa: E402, F401
from archnet import tokenconvert as _tokenconvert  # noqa: E402, F401

# a student.pt saved before ChannelSplit moved to its own module loads it from here
from archnet.channelsplit import ChannelSplit  # noqa: E402, F401
