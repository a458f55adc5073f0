"""Conv kernels re-expressed as stacks of 3x3 convs, the only kernel an Arch-Net chip runs.

:mod:`archnet.opconvert`'s Conv2d converter picks one of these per kernel: exact where the
kernel allows (patchify strides, 1xk / kx1 lines, two-conv patch factorisations), otherwise a
centre crop plus Dirac identities least-squares fitted to the whole kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FIT_MAX_UNKNOWNS",
    "ConvStack",
    "conv3x3",
    "conv_bias",
    "conv_stack",
    "dense_weight",
    "line_stack",
    "patchify_stack",
    "square_kernel",
]

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


def dense_weight(conv: nn.Conv2d) -> Tensor:
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


def square_kernel(weight: Tensor) -> Tensor:
    """Zero-pad a 1xk / kx1 (odd) kernel to kxk; centred, so 'same' padding still holds."""
    kh, kw = weight.shape[2:]
    k = max(kh, kw)
    ph, pw = (k - kh) // 2, (k - kw) // 2
    return F.pad(weight, (pw, k - kw - pw, ph, k - kh - ph))


def conv3x3(
    in_ch: int,
    out_ch: int,
    kernel: Tensor,
    bias: Tensor | None,
    stride: int,
    padding: int | tuple[int, int] = 1,
) -> nn.Conv2d:
    """A 3x3 conv holding ``kernel`` (and ``bias``)."""
    conv = nn.Conv2d(in_ch, out_ch, 3, stride, padding, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def conv_bias(conv: nn.Conv2d) -> Tensor | None:
    """``conv``'s bias, detached, on the CPU where the stacks are built."""
    return None if conv.bias is None else conv.bias.detach().cpu().clone()


def patchify_stack(kernel: Tensor, bias: Tensor | None) -> ConvStack:
    """Non-overlapping kxk stride-k conv (k = 2**n, a ViT/ConvNeXt "patchify" stem) as n
    stride-2 convs, exact for input sizes divisible by k: each but the last moves every 2x2
    patch into channels (4x), the last holds the teacher's taps."""
    layers = []
    while kernel.shape[-1] > 2:
        out_ch, in_ch, k = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
        split = torch.eye(4 * in_ch, dtype=kernel.dtype).reshape(4 * in_ch, in_ch, 2, 2)
        layers.append(conv3x3(in_ch, 4 * in_ch, F.pad(split, (1, 0, 1, 0)), None, 2))
        # tap (2 * e + d) of the kernel becomes tap e of channel (c, d)
        kernel = kernel.reshape(out_ch, in_ch, k // 2, 2, k // 2, 2).permute(0, 1, 3, 5, 2, 4)
        kernel = kernel.reshape(out_ch, 4 * in_ch, k // 2, k // 2)
    out_ch, in_ch = kernel.shape[:2]
    layers.append(conv3x3(in_ch, out_ch, F.pad(kernel, (1, 0, 1, 0)), bias, 2))
    return ConvStack(*layers)


def line_stack(weight: Tensor, bias: Tensor | None) -> ConvStack:
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
        layers.append(conv3x3(width, w.shape[0], w, bias if last else None, 1))
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
        conv3x3(in_ch, in_ch * 9, first, None, stride),
        conv3x3(in_ch * 9, out_ch, second.reshape(out_ch, in_ch * 9, 3, 3), bias, 1),
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


def conv_stack(
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
            conv3x3(in_ch if i == 0 else out_ch, out_ch, w, last_bias, stride if i == 0 else 1)
        )
    return ConvStack(*layers)
