"""Depthwise-separable candidates: kxk depthwise -> [SE] -> 1x1 project.

The expansion-1 member of the MBConv design space (MobileNetV2's first block, EfficientNet's
"ds" blocks): the cheapest learned option, useful where a block contributes little. Linear
output; identity shortcut only when the block keeps its shape.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ._layers import ConvBnAct, build_stacked, create_se, gate_for
from ._registry import register_candidate

__all__ = ["DepthwiseSeparable"]


class DepthwiseSeparable(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        kernel_size: int = 3,
        se: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_ch == out_ch
        self.conv_dw = ConvBnAct(in_ch, in_ch, kernel_size, stride, groups=in_ch, act=act)
        self.se = create_se(in_ch, in_ch, act, gate_for(act)) if se else nn.Identity()
        self.conv_pw = ConvBnAct(in_ch, out_ch, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_pw(self.se(self.conv_dw(x)))
        return out + x if self.has_skip else out


# name: (kernel, se, act)
_VARIANTS: dict[str, tuple[int, bool, str]] = {
    "dwsep_k3_relu": (3, False, "relu"),
    "dwsep_k5_relu": (5, False, "relu"),
    "dwsep_k3_se_silu": (3, True, "silu"),
}

for _name, (_k, _se, _act) in _VARIANTS.items():
    _tags = {"depthwise", _act, f"k{_k}", "e1", "d1"} | ({"se"} if _se else set())
    register_candidate(_name, "dwsep", _tags)(
        partial(build_stacked, DepthwiseSeparable, kernel_size=_k, se=_se, act=_act)
    )
