"""Small building blocks shared by the candidate families.

Only standard layers (Conv2d, BatchNorm2d, ReLU/SiLU, Sigmoid/Hardsigmoid, AvgPool2d) are
used so later passes (BN folding, activation swaps, quantization) can find them by type.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from archnet.blocks import BlockSpec

_ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU}
_GATES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid}


def create_act(name: str | None) -> nn.Module:
    """Activation by name; ``None`` or ``""`` gives ``nn.Identity`` (a linear output)."""
    if not name:
        return nn.Identity()
    return _ACTS[name]()


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` (never down by more than 10%), as in
    MobileNet: hardware runs aligned channel counts markedly faster."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def conv_stride(spec: BlockSpec) -> int | tuple[int, int]:
    """Stride a candidate must use for ``spec``: one factor, or (height, width) factors where
    they differ (a block halving only the height); 0 when no 2-D conv block can match it."""
    if len(spec.in_shape) != 3 or len(spec.out_shape) != 3:
        return 0
    return spec.stride or spec.strides or 0


class ConvBnAct(nn.Sequential):
    """Conv2d (no bias, 'same' padding for odd kernels) -> BatchNorm2d -> activation.

    With odd ``kernel_size`` and stride ``s`` the output is ``ceil(H / s)``, i.e. exactly
    ``H / s`` for every integer down-sampling a :class:`BlockSpec` allows.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 1,
        stride: int | tuple[int, int] = 1,
        groups: int = 1,
        act: str | None = "relu",
    ) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(
                    in_ch,
                    out_ch,
                    kernel_size,
                    stride=stride,
                    padding=kernel_size // 2,
                    groups=groups,
                    bias=False,
                ),
                bn=nn.BatchNorm2d(out_ch),
                act=create_act(act),
            )
        )


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> 1x1 reduce -> act -> 1x1 expand -> gate."""

    def __init__(
        self, channels: int, rd_channels: int, act: str = "relu", gate: str = "sigmoid"
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = create_act(act)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = _GATES[gate]()

    def forward(self, x: Tensor) -> Tensor:
        s = self.act(self.conv_reduce(self.pool(x)))
        return x * self.gate(self.conv_expand(s))


def create_se(channels: int, in_ch: int, act: str, gate: str) -> SqueezeExcite:
    """SE sized from the block input (as EfficientNet does), so it stays cheap at high
    expansion."""
    return SqueezeExcite(channels, max(8, in_ch // 4), act=act, gate=gate)


def gate_for(act: str) -> str:
    """SE gate matching the block activation: hard-sigmoid with ReLU (MobileNetV3),
    sigmoid with SiLU (EfficientNet)."""
    return "sigmoid" if act == "silu" else "hard_sigmoid"


def build_stacked(
    layer: Callable[..., nn.Module], spec: BlockSpec, depth: int = 1, **kw: Any
) -> nn.Module | None:
    """``layer(in, out, stride, **kw)`` for the block, then ``depth - 1`` shape-keeping copies.

    The builder shared by every conv-block family; None when no 2-D conv block fits ``spec``.
    """
    stride = conv_stride(spec)
    if not stride:
        return None
    return stack(
        layer(spec.in_ch, spec.out_ch, stride, **kw),
        lambda: layer(spec.out_ch, spec.out_ch, 1, **kw),
        depth,
    )


def stack(first: nn.Module, make_rest, depth: int) -> nn.Module:
    """``first`` alone for depth 1, else ``first`` followed by ``depth - 1`` same-shape layers.

    Only the first layer changes shape, so the following ones keep their identity shortcut.
    """
    if depth == 1:
        return first
    return nn.Sequential(first, *(make_rest() for _ in range(depth - 1)))


class ChannelsLast(nn.Module):
    """An NCHW module serving an NHWC stream (timm Swin, ConvNeXt's channels-last blocks):
    permuted to channels first on the way in and back on the way out, two Transposes an
    NPU folds into its layout choice."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
