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
                                       layer (exact, :func:`_line_stack`)
Conv2d 2x2 stride 2                    3x3 stride-2 conv, taps in its lower-right 2x2
                                       (exact for even input sizes)
Conv2d kxk stride k, k = 2^n >= 4      n stride-2 3x3 convs moving 2x2 patches to channels,
("patchify" stems)                     the last holding the taps (exact for sizes divisible
                                       by k)
Conv2d kxk, k odd >= 5 (or 1xk, kx1    linear stack of 3x3 convs with the same receptive
stride 2), stride 1 or 2               field, stride on the first (:class:`ConvStack`):
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
from torch import Tensor, nn

__all__ = [
    "ConvStack",
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


# --- convolutions ----------------------------------------------------------------------------
#: Least-squares fits of conv stacks are skipped above this many unknowns per output channel
#: (the normal equations are this size squared); the stack then keeps its crop/Dirac start.
FIT_MAX_UNKNOWNS = 2304
_FIT_ROUNDS = 6
_FIT_RIDGE = 1e-5


class ConvStack(nn.Sequential):
    """3x3 convs with no activation in between, standing in for one larger linear conv.

    For a kxk conv the stride is on the first layer and the receptive field grows by
    ``2 * stride`` per further layer, so ``1 + ceil((k - 3) / (2 * stride))`` layers cover
    it; a kxk stride-k "patchify" conv becomes ``log2(k)`` stride-2 layers. Its own class
    so reports and later passes can tell a converted kernel from designed layers.
    """


def _dense_weight(conv: nn.Conv2d) -> Tensor:
    """Weight of the equivalent dense conv: each group's kernels placed block-diagonally."""
    w = conv.weight.detach()
    g = conv.groups
    if g == 1:
        return w.clone()
    out_g, in_g = conv.out_channels // g, conv.in_channels // g
    dense = w.new_zeros(conv.out_channels, conv.in_channels, *w.shape[2:])
    for i in range(g):
        dense[i * out_g : (i + 1) * out_g, i * in_g : (i + 1) * in_g] = w[
            i * out_g : (i + 1) * out_g
        ]
    return dense


def _square_kernel(weight: Tensor) -> Tensor:
    """Zero-pad a 1xk / kx1 (odd) kernel to kxk; centred, so 'same' padding still holds."""
    kh, kw = weight.shape[2:]
    k = max(kh, kw)
    ph, pw = (k - kh) // 2, (k - kw) // 2
    return F.pad(weight, (pw, k - kw - pw, ph, k - kh - ph))


def _padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Explicit padding of ``conv``; ``None`` for 'same' on even kernels (asymmetric)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        kh, kw = conv.kernel_size
        return (kh // 2, kw // 2) if kh % 2 and kw % 2 else None
    return _pair(conv.padding)


def _conv3x3(
    in_ch: int,
    out_ch: int,
    kernel: Tensor,
    bias: Tensor | None,
    stride: int,
    padding: int | tuple[int, int] = 1,
) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, stride, padding, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _bias(conv: nn.Conv2d) -> Tensor | None:
    return None if conv.bias is None else conv.bias.detach().cpu().clone()


def _patchify_stack(kernel: Tensor, bias: Tensor | None) -> ConvStack:
    """Non-overlapping kxk stride-k conv (k = 2**n, a ViT/ConvNeXt "patchify" stem) as n
    stride-2 convs, exact for input sizes divisible by k: each but the last moves every 2x2
    patch into channels (4x), the last holds the teacher's taps."""
    layers = []
    while kernel.shape[-1] > 2:
        out_ch, in_ch, k = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
        split = torch.eye(4 * in_ch, dtype=kernel.dtype).reshape(4 * in_ch, in_ch, 2, 2)
        layers.append(_conv3x3(in_ch, 4 * in_ch, F.pad(split, (1, 0, 1, 0)), None, 2))
        # tap (2 * e + d) of the kernel becomes tap e of channel (c, d)
        kernel = kernel.reshape(out_ch, in_ch, k // 2, 2, k // 2, 2).permute(0, 1, 3, 5, 2, 4)
        kernel = kernel.reshape(out_ch, 4 * in_ch, k // 2, k // 2)
    out_ch, in_ch = kernel.shape[:2]
    layers.append(_conv3x3(in_ch, out_ch, F.pad(kernel, (1, 0, 1, 0)), bias, 2))
    return ConvStack(*layers)


@register_converter(nn.Conv2d)
def _convert_conv(conv: nn.Conv2d) -> nn.Module | None:
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    padding = _padding(conv)
    if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or sh != sw:
        return None
    if kh == kw == sh > 2 and kh & (kh - 1) == 0 and padding == (0, 0):
        return _patchify_stack(_dense_weight(conv).cpu(), _bias(conv))
    if sh > 2:
        return None
    if padding is None or ((kh, kw) == (3, 3) and conv.groups == 1):
        return None
    stride, in_ch, out_ch = sh, conv.in_channels, conv.out_channels
    weight = _dense_weight(conv).cpu()
    bias = _bias(conv)
    if kh in (1, 3) and kw in (1, 3):  # grouped 3x3 (dense now), 1x1, 1x3, 3x1: any padding
        pad = (padding[0] + (3 - kh) // 2, padding[1] + (3 - kw) // 2)
        kernel = F.pad(weight, ((3 - kw) // 2,) * 2 + ((3 - kh) // 2,) * 2)
        return _conv3x3(in_ch, out_ch, kernel, bias, stride, pad)
    if (kh, kw) == (2, 2) and stride == 2 and padding == (0, 0):
        # window 2i..2i+1 is the 3x3 window 2i-1..2i+1 (padding 1) without its first row/col
        return _conv3x3(in_ch, out_ch, F.pad(weight, (1, 0, 1, 0)), bias, stride)
    if kh % 2 == 0 or kw % 2 == 0 or padding != (kh // 2, kw // 2):
        return None
    if min(kh, kw) == 1 and stride == 1:
        return _line_stack(weight, bias)
    return _conv_stack(in_ch, out_ch, _square_kernel(weight), bias, stride)


def _line_stack(weight: Tensor, bias: Tensor | None) -> ConvStack:
    """A 1xk / kx1 'same' conv (k = 2r + 1 >= 5, stride 1) as r exact 3x3 convs: layer j
    adds taps -j and +j to the partial sum P and carries the input shifted j to each side
    (``L``, ``R``; width out + 2 in). A shift reads only towards the image border it moves
    to, so zero padding there is the teacher's own padding: exact at the borders too."""
    out_ch, in_ch = weight.shape[:2]
    horizontal = weight.shape[2] == 1
    taps = weight.reshape(out_ch, in_ch, -1)
    r = taps.shape[-1] // 2

    def at(offset: int) -> tuple[int, int]:  # kernel position of a shift along the line
        return (1, 1 + offset) if horizontal else (1 + offset, 1)

    layers, width = [], in_ch
    for j in range(1, r + 1):
        last = j == r
        w = weight.new_zeros(out_ch if last else out_ch + 2 * in_ch, width, 3, 3)
        if j == 1:  # from x: taps -1..1 into P, x(p -+ 1) into L, R
            for a in (-1, 0, 1):
                w[:out_ch, :, at(a)[0], at(a)[1]] = taps[:, :, r + a]
            src_l = src_r = slice(0, in_ch)
        else:  # P kept, taps -+j read from L, R one step further out
            w[:out_ch, :out_ch, 1, 1] = torch.eye(out_ch, dtype=w.dtype)
            src_l, src_r = slice(out_ch, out_ch + in_ch), slice(out_ch + in_ch, width)
            w[:out_ch, src_l, at(-1)[0], at(-1)[1]] = taps[:, :, r - j]
            w[:out_ch, src_r, at(1)[0], at(1)[1]] = taps[:, :, r + j]
        if not last:
            eye = torch.eye(in_ch, dtype=w.dtype)
            w[out_ch : out_ch + in_ch, src_l, at(-1)[0], at(-1)[1]] = eye
            w[out_ch + in_ch :, src_r, at(1)[0], at(1)[1]] = eye
        layers.append(_conv3x3(width, w.shape[0], w, bias if last else None, 1))
        width = w.shape[0]
    return ConvStack(*layers)


def _compose(first: Tensor, second: Tensor, stride: int) -> Tensor:
    """Kernel of ``second`` applied after ``first``, on ``first``'s stride-``stride`` grid.

    ``K[o, i, u] = sum_{m, a} second[o, m, a] * first[m, i, u - stride * a]``: a full
    convolution of the two kernels with ``second`` dilated by the stride (borders aside).
    """
    pad = stride * (second.shape[-1] - 1)
    out = F.conv2d(first.transpose(0, 1), second.flip(-1, -2), padding=pad, dilation=stride)
    return out.transpose(0, 1)


def _composite(weights: Sequence[Tensor], stride: int) -> Tensor:
    kernel = weights[0]
    for w in weights[1:]:
        kernel = _compose(kernel, w, stride)
    return kernel


def _ridge(design: Tensor, targets: Tensor, start: Tensor) -> Tensor:
    """Rows of ``start`` moved to ``argmin |design @ x - t|^2 + lam |x - start|^2`` per row.

    The small ridge keeps the solution near the crop/Dirac start where the fit is
    underdetermined, so the weights stay well scaled for training.
    """
    gram = design.T @ design
    lam = _FIT_RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    rhs = design.T @ targets.T + lam * start.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, rhs).T


def _identity_basis(channels: int, dtype: torch.dtype) -> Tensor:
    """``(channels * 9, channels, 3, 3)``: one kernel per (channel, tap) unknown."""
    return torch.eye(channels * 9, dtype=dtype).reshape(channels * 9, channels, 3, 3)


@torch.no_grad()
def _fit_stack(weights: list[Tensor], target: Tensor, stride: int) -> list[Tensor]:
    """Alternating least squares on the first and last layer so the stack's composite kernel
    matches ``target`` (zero-padded to the stack's receptive field); inner layers stay Dirac."""
    out_ch, in_ch = target.shape[:2]
    mid = weights[0].shape[0]
    size = _composite(weights, stride).shape[-1]
    pad = (size - target.shape[-1]) // 2
    target = F.pad(target, (pad, pad, pad, pad))
    basis = _identity_basis(mid, target.dtype)
    for _ in range(_FIT_ROUNDS):
        # last layer: per output channel, composite = sum over (m, tap) of shifted prefix kernels
        prefix = _composite(weights[:-1], stride)  # (mid, in, r, r)
        design = _compose(prefix, basis, stride).reshape(mid * 9, -1).T  # (in*R*R, mid*9)
        last = _ridge(design, target.reshape(out_ch, -1), weights[-1].reshape(out_ch, -1))
        weights[-1] = last.reshape(out_ch, mid, 3, 3)
        # first layer: per input channel, the same design over (m, tap) of the suffix kernel
        suffix = _composite(weights[1:], 1)  # (out, mid, q, q) on the strided grid
        first_basis = basis.transpose(0, 1)  # (mid, mid*9, 3, 3): unknown j feeds channel m
        design = _compose(first_basis, suffix, stride)  # (out, mid*9, R, R)
        design = design.permute(0, 2, 3, 1).reshape(-1, mid * 9)
        tgt = target.permute(1, 0, 2, 3).reshape(in_ch, -1)
        first = _ridge(design, tgt, weights[0].permute(1, 0, 2, 3).reshape(in_ch, -1))
        weights[0] = first.reshape(in_ch, mid, 3, 3).permute(1, 0, 2, 3)
    return weights


def _fit_fits(in_ch: int, out_ch: int, size: int) -> bool:
    """Whether the least-squares fit is cheap: bounded unknowns and design matrices."""
    unknowns = out_ch * 9
    return unknowns <= FIT_MAX_UNKNOWNS and max(in_ch, out_ch) * size * size * unknowns <= 3e7


def _stack_depth(k: int, stride: int) -> int:
    return 1 + math.ceil((k - 3) / (2 * stride))


def _split_tap(u: int, stride: int) -> tuple[int, int]:
    """Offset ``u`` of the composite kernel as ``stride * a + b`` with taps ``a, b`` in -1..1.

    ``a`` is 0 whenever possible and never has the opposite sign of ``b``: a path through
    the second conv's zero padding then only ever reads input outside the image, where the
    teacher's own padding is zero too, so the factorisation stays exact at the borders.
    """
    a = 0 if abs(u) <= 1 else (1 if u > 0 else -1)
    return a, u - stride * a


def _patch_stack(kernel: Tensor, bias: Tensor | None, stride: int) -> ConvStack:
    """Exact two-conv factorisation: the first conv copies each input channel's 3x3 patch
    (sampled at the stride) into 9 channels, the second holds the teacher's taps."""
    out_ch, in_ch, k = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    first = torch.zeros(in_ch * 9, in_ch, 3, 3, dtype=kernel.dtype)
    for i in range(in_ch):
        first[i * 9 : (i + 1) * 9, i] = torch.eye(9, dtype=kernel.dtype).reshape(9, 3, 3)
    second = torch.zeros(out_ch, in_ch, 3, 3, 3, 3, dtype=kernel.dtype)  # o, i, by, bx, ay, ax
    r = k // 2
    for uy in range(-r, r + 1):
        ay, by = _split_tap(uy, stride)
        for ux in range(-r, r + 1):
            ax, bx = _split_tap(ux, stride)
            second[:, :, by + 1, bx + 1, ay + 1, ax + 1] = kernel[:, :, uy + r, ux + r]
    return ConvStack(
        _conv3x3(in_ch, in_ch * 9, first, None, stride),
        _conv3x3(in_ch * 9, out_ch, second.reshape(out_ch, in_ch * 9, 3, 3), bias, 1),
    )


def _stack_error(weights: Sequence[Tensor], kernel: Tensor, stride: int) -> float:
    """Relative error of the stack against the kxk conv on a random probe image, borders
    included (the kernel-space fit does not see the zero padding between the layers)."""
    gen = torch.Generator().manual_seed(0)
    size = 4 * kernel.shape[-1]
    x = torch.randn(2, kernel.shape[1], size, size, generator=gen, dtype=kernel.dtype)
    ref = F.conv2d(x, kernel, stride=stride, padding=kernel.shape[-1] // 2)
    y = x
    for i, w in enumerate(weights):
        y = F.conv2d(y, w, stride=stride if i == 0 else 1, padding=1)
    return float((y - ref).norm() / ref.norm().clamp_min(1e-12))


def _conv_stack(
    in_ch: int, out_ch: int, kernel: Tensor, bias: Tensor | None, stride: int, fit: bool = True
) -> ConvStack:
    """kxk conv (k odd >= 5) as a linear stack of 3x3 convs.

    Two convs suffice when ``stride == 2`` or ``k == 5``; if the input is narrow (``9 * in_ch
    <= 2 * out_ch``, typical of stems) they are the exact patch factorisation. Otherwise the
    stack has width ``out_ch``, starts as the centre crop followed by Dirac identities and,
    with ``fit``, is least-squares fitted to the whole kernel (kept only if it beats the
    crop on a probe image).
    """
    kernel = kernel.double()
    k = kernel.shape[-1]
    depth = _stack_depth(k, stride)
    if fit and depth == 2 and 9 * in_ch <= 2 * out_ch:
        return _patch_stack(kernel, bias, stride)
    c = (k - 3) // 2
    weights = [kernel[:, :, c : c + 3, c : c + 3]]
    eye = torch.zeros(out_ch, out_ch, 3, 3, dtype=kernel.dtype)
    nn.init.dirac_(eye)
    weights += [eye.clone() for _ in range(depth - 1)]
    if fit and _fit_fits(in_ch, out_ch, 3 + 2 * stride * (depth - 1)):
        fitted = _fit_stack(list(weights), kernel, stride)
        if _stack_error(fitted, kernel, stride) < _stack_error(weights, kernel, stride):
            weights = fitted
    layers = []
    for i, w in enumerate(weights):
        last_bias = bias if i == depth - 1 else None
        layers.append(
            _conv3x3(in_ch if i == 0 else out_ch, out_ch, w, last_bias, stride if i == 0 else 1)
        )
    return ConvStack(*layers)


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


class ChannelSplit(nn.Module):
    """One wide layer as parallel slices concatenated along channels (or features).

    Chips that cap the channels of a layer still run Concat, so a layer with too many outputs
    becomes several narrow ones; the result is exact. Too many *inputs* cannot be split this
    way (the partial sums would need an Add), so such layers are left for the checker.
    """

    def __init__(self, parts: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=self.dim)


def _slice_layer(layer: nn.Conv2d | nn.Linear, lo: int, hi: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        part = nn.Conv2d(
            layer.in_channels,
            hi - lo,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
        )
    else:
        part = nn.Linear(layer.in_features, hi - lo, layer.bias is not None)
    with torch.no_grad():
        part.weight.copy_(layer.weight[lo:hi])
        if layer.bias is not None:
            part.bias.copy_(layer.bias[lo:hi])
    return part.to(layer.weight.dtype)


def split_wide_layers(
    model: nn.Module, max_channels: int, names_to_skip: Iterable[str] = ()
) -> list[tuple[str, str, str]]:
    """Split every dense Conv2d / Linear with more than ``max_channels`` outputs, in place.

    Returns one (name, was, now) row per split made; a model that is itself one wide layer
    cannot be split in place, so it gets none (the target check reports the layer)."""
    skip = tuple(names_to_skip)
    rows: list[tuple[str, str, str]] = []
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Conv2d, nn.Linear) or not name:
            continue  # a root layer cannot be swapped in place: left for the checker
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        if out <= max_channels or getattr(module, "groups", 1) != 1:
            continue
        bounds = list(range(0, out, max_channels)) + [out]
        split = ChannelSplit(
            [_slice_layer(module, lo, hi) for lo, hi in zip(bounds, bounds[1:])],
            dim=1 if isinstance(module, nn.Conv2d) else -1,
        )
        model.set_submodule(name, split)
        rows.append(
            (name, describe(module), f"{len(bounds) - 1} x {type(module).__name__} + Concat")
        )
    return rows


# Transformer conversions register themselves on import; at the end, as they use this module.
from archnet import legalize as _legalize  # noqa: E402, F401
from archnet import tokenconvert as _tokenconvert  # noqa: E402, F401
