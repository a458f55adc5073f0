"""Arch-Net candidates: blocks built only from operators that nearly every NPU/ASIC runs.

Arch-Net rebuilds a teacher from 3x3 dense convolution (stride 1 or 2), 2x2 stride-2
max-pooling, BatchNorm, ReLU, concatenation (plus fully connected layers and global average
pooling in the head). There is no element-wise ``Add``, so the residual connection is
replaced by concatenating the shortcut with the block's features and fusing both with one
3x3 conv: ``y = BN(conv3x3(concat([h(x), shortcut(x)])))``, where the shortcut is ``x``
itself or ``x`` max-pooled down to the block's stride.

Strides that are powers of two are built from stride-2 steps: extra 2x2 max-pools in front
of a stride-2 conv, and repeated 2x2 max-pools on the shortcut. An odd stride factor (3, 5,
...) has no such decomposition; there the last conv takes that stride and the shortcut an
``r x r`` max-pool, the only way these blocks can still match the shape (such blocks are
outside the restricted set and a target check will say so).

Every block ends with conv + BN and no ReLU, so like the teacher's features the output can
be negative.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from archnet.blocks import BlockSpec

from ._layers import ConvBnAct, conv_stride, make_divisible
from ._registry import register_candidate

__all__ = ["ArchConcatBlock", "down_conv", "pool_shortcut", "split_stride"]


def split_stride(stride: int) -> tuple[int, int]:
    """``stride == 2**k * r`` with ``r`` odd, as ``(k, r)``."""
    k = 0
    while stride % 2 == 0:
        stride //= 2
        k += 1
    return k, stride


def down_conv(in_ch: int, out_ch: int, stride: int, act: str | None = "relu") -> nn.Module:
    """3x3 conv-BN[-act] that down-samples by ``stride`` using only stride-2 steps where it can.

    Stride 1 and 2 are a single conv (so weights transfer one to one from a teacher conv);
    stride ``2**k`` puts ``k - 1`` free 2x2 max-pools in front of a stride-2 conv.
    """
    k, r = split_stride(stride)
    if r == 1 and k <= 1:
        return ConvBnAct(in_ch, out_ch, 3, stride, act=act)
    pools = k - 1 if r == 1 else k
    conv_s = 2 if r == 1 else r
    return nn.Sequential(
        *(nn.MaxPool2d(2, 2) for _ in range(pools)), ConvBnAct(in_ch, out_ch, 3, conv_s, act=act)
    )


def pool_shortcut(stride: int) -> nn.Module:
    """Parameter-free shortcut matching ``stride``: identity, or 2x2 max-pools (plus an
    ``r x r`` max-pool for an odd factor ``r``)."""
    k, r = split_stride(stride)
    pools: list[nn.Module] = [nn.MaxPool2d(2, 2) for _ in range(k)]
    if r > 1:
        pools.append(nn.MaxPool2d(r, r))
    if not pools:
        return nn.Identity()
    return pools[0] if len(pools) == 1 else nn.Sequential(*pools)


class ArchConcatBlock(nn.Module):
    """Arch-Net's residual block without ``Add``: fuse ``[h(x), shortcut(x)]`` with a 3x3 conv.

    ``h`` comes first in the concatenation so that, when weights are inherited from a
    residual teacher, the teacher's last conv (which reads ``h``'s channels) lands on the
    matching input channels of the fusing conv. With ``in_ch == out_ch`` the fusing conv
    starts as a Dirac identity on the shortcut channels and zero on ``h``, so the block
    starts as (the pooled) ``x``, the way a zero-initialised residual branch does.
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, width: float = 1.0, depth: int = 1
    ) -> None:
        super().__init__()
        mid = make_divisible(out_ch * width)
        layers = [down_conv(in_ch, mid, stride)]
        layers += [ConvBnAct(mid, mid, 3) for _ in range(depth - 1)]
        self.h = layers[0] if depth == 1 else nn.Sequential(*layers)
        self.shortcut = pool_shortcut(stride)
        self.fuse = ConvBnAct(mid + in_ch, out_ch, 3, act=None)
        if in_ch == out_ch:
            with torch.no_grad():
                weight = self.fuse.conv.weight
                weight[:, :mid].zero_()
                nn.init.dirac_(weight[:, mid:])

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.h(x), self.shortcut(x)], dim=1))


def _build_conv(spec: BlockSpec, depth: int) -> nn.Module | None:
    stride = conv_stride(spec)
    if not isinstance(stride, int) or not stride:
        return None  # (h, w) factors that differ: no 3x3 stride 1 or 2 conv matches them
    if depth == 1:
        return down_conv(spec.in_ch, spec.out_ch, stride, act=None)
    return nn.Sequential(
        down_conv(spec.in_ch, spec.out_ch, stride),
        ConvBnAct(spec.out_ch, spec.out_ch, 3, act=None),
    )


def _build_concat(spec: BlockSpec, width: float, depth: int) -> nn.Module | None:
    stride = conv_stride(spec)
    if not isinstance(stride, int) or not stride:
        return None
    return ArchConcatBlock(spec.in_ch, spec.out_ch, stride, width=width, depth=depth)


_TAGS = {"archnet", "restricted", "dense", "relu", "k3"}

register_candidate("archnet_conv", "archnet", _TAGS | {"d1"})(partial(_build_conv, depth=1))
register_candidate("archnet_conv_d2", "archnet", _TAGS | {"d2"})(partial(_build_conv, depth=2))
register_candidate("archnet_concat", "archnet", _TAGS | {"d2", "concat"})(
    partial(_build_concat, width=1.0, depth=1)
)
register_candidate("archnet_concat_w05", "archnet", _TAGS | {"d2", "concat", "narrow"})(
    partial(_build_concat, width=0.5, depth=1)
)
register_candidate("archnet_concat_d2", "archnet", _TAGS | {"d3", "concat"})(
    partial(_build_concat, width=1.0, depth=2)
)
