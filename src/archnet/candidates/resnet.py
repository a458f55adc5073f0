"""ResNet candidates: basic (3x3-3x3) and bottleneck (1x1-3x3-1x1) residual blocks.

Dense 3x3 convs are what most accelerators run best. Unlike the MBConv families these keep
ResNet's conventions so a ResNet teacher block transfers exactly: a projection shortcut
(stride-s 1x1 conv + BN) whenever the block changes shape, and a ReLU after the addition
(non-negative output, matching ResNet teachers).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from archnet.blocks import BlockSpec

from ._layers import ConvBnAct, conv_stride, make_divisible
from ._registry import register_candidate

__all__ = ["BasicBlock", "Bottleneck"]


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return ConvBnAct(in_ch, out_ch, 1, stride, act=None)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; ``width`` scales the hidden channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, width: float = 1.0) -> None:
        super().__init__()
        mid = make_divisible(out_ch * width)
        self.conv1 = ConvBnAct(in_ch, mid, 3, stride, act="relu")
        self.conv2 = ConvBnAct(mid, out_ch, 3, act=None)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided, as in ResNet v1.5) -> 1x1 expand."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, width: float = 0.25) -> None:
        super().__init__()
        mid = make_divisible(out_ch * width)
        self.conv1 = ConvBnAct(in_ch, mid, 1, act="relu")
        self.conv2 = ConvBnAct(mid, mid, 3, stride, act="relu")
        self.conv3 = ConvBnAct(mid, out_ch, 1, act=None)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


def _build(spec: BlockSpec, block: type[nn.Module], width: float) -> nn.Module | None:
    stride = conv_stride(spec)
    if not stride:
        return None
    return block(spec.in_ch, spec.out_ch, stride, width=width)


register_candidate("resnet_basic", "resnet", {"dense", "relu", "k3", "d2"})(
    partial(_build, block=BasicBlock, width=1.0)
)
register_candidate("resnet_basic_w05", "resnet", {"dense", "relu", "k3", "d2", "narrow"})(
    partial(_build, block=BasicBlock, width=0.5)
)
register_candidate("resnet_bottleneck", "resnet", {"dense", "relu", "k3", "d3", "bottleneck"})(
    partial(_build, block=Bottleneck, width=0.25)
)
