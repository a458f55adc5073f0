"""Start a candidate from its teacher block's weights.

Blockwise distillation converges much faster when a student begins near the function it must
imitate. Candidates rarely share the teacher's exact structure, so weights are transferred
layer by layer wherever shapes overlap: channel prefixes, a centre crop of larger kernels, a
centre placement (zero border) into larger kernels.
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch
from torch import nn

__all__ = ["inherit_weights", "layer_kind"]


def _conv_kind(conv: nn.Conv2d) -> str:
    """Role of a conv, used to pair student and teacher layers.

    Biased 1x1 convs are squeeze-excite (or similar gating) layers in practically every
    CNN, while convs followed by a norm carry no bias; keeping them apart stops a gate from
    swallowing a main-path conv.
    """
    if conv.groups > 1:
        return "depthwise" if conv.groups == conv.in_channels else "grouped"
    if conv.bias is not None and conv.kernel_size == (1, 1):
        return "gate"
    return "dense"


def layer_kind(module: nn.Module, last_conv: str | None = None) -> str | None:
    """Pairing key of a transferable layer, ``None`` for anything else.

    A BatchNorm is keyed by the conv before it, so norms pair up with the same partners
    as their convs.
    """
    if isinstance(module, nn.Conv2d):
        return "conv:" + _conv_kind(module)
    if isinstance(module, nn.BatchNorm2d):
        return f"bn:{last_conv}"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    last_conv: str | None = None
    for module in root.modules():
        kind = layer_kind(module, last_conv)
        if kind is None:
            continue
        if isinstance(module, nn.Conv2d):
            last_conv = _conv_kind(module)
        out.append((kind, module))
    return out


def _kernel_slices(s_size: int, t_size: int) -> tuple[slice, slice]:
    """(student, teacher) slices of one kernel axis that align the two centres."""
    if s_size <= t_size:
        start = (t_size - s_size) // 2
        return slice(None), slice(start, start + s_size)
    start = (s_size - t_size) // 2
    return slice(start, start + t_size), slice(None)


@torch.no_grad()
def _copy_prefix(dst: torch.Tensor | None, src: torch.Tensor | None) -> int:
    """Copy the overlapping leading block of ``src`` into ``dst``; returns 1 if copied."""
    if dst is None or src is None or dst.dim() != src.dim():
        return 0
    idx = tuple(slice(0, min(d, s)) for d, s in zip(dst.shape, src.shape, strict=True))
    dst[idx].copy_(src[idx])
    return 1


@torch.no_grad()
def _copy_conv(dst: nn.Conv2d, src: nn.Conv2d) -> int:
    o = min(dst.out_channels, src.out_channels)
    i = min(dst.weight.shape[1], src.weight.shape[1])
    (sh, th), (sw, tw) = (
        _kernel_slices(d, s)
        for d, s in zip(dst.weight.shape[2:], src.weight.shape[2:], strict=True)
    )
    region = dst.weight[:o, :i]
    if dst.weight.shape[2:] != src.weight.shape[2:]:
        region.zero_()  # a larger student kernel gets a zero border around the teacher's
    region[:, :, sh, sw].copy_(src.weight[:o, :i, th, tw])
    return 1 + _copy_prefix(dst.bias, src.bias)


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d) -> int:
    n = 0
    for attr in ("weight", "bias", "running_mean", "running_var"):
        n += _copy_prefix(getattr(dst, attr), getattr(src, attr))
    if dst.num_batches_tracked is not None and src.num_batches_tracked is not None:
        dst.num_batches_tracked.copy_(src.num_batches_tracked)
        n += 1
    return n


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> int:
    return _copy_prefix(dst.weight, src.weight) + _copy_prefix(dst.bias, src.bias)


@torch.no_grad()
def inherit_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Copy ``teacher`` weights into ``student`` in place; returns the number of tensors copied.

    Conv2d, BatchNorm2d and Linear layers of both are walked in definition order and paired
    greedily by kind: the i-th depthwise conv of the student takes the i-th depthwise conv
    of the teacher, dense with dense, gates with gates, and each BatchNorm follows its conv.
    Only the overlapping slice is copied; student entries outside it keep their init. When
    the structures match this is an exact copy of every conv, norm and linear tensor.
    """
    pending: dict[str, deque[nn.Module]] = defaultdict(deque)
    for kind, module in _layers(teacher):
        pending[kind].append(module)

    copied = 0
    for kind, dst in _layers(student):
        if not pending[kind]:
            continue
        src = pending[kind].popleft()
        if isinstance(dst, nn.Conv2d):
            copied += _copy_conv(dst, src)
        elif isinstance(dst, nn.BatchNorm2d):
            copied += _copy_bn(dst, src)
        else:
            copied += _copy_linear(dst, src)
    return copied
