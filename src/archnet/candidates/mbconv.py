"""Inverted residual (MBConv) candidates: 1x1 expand -> kxk depthwise -> [SE] -> 1x1 project.

The workhorse of MobileNetV2/V3 and EfficientNet: cheap in MACs, and the depthwise conv is
where kernel size can grow at little cost. The output is linear (no final activation), and
the identity shortcut is used only when the block keeps its shape, as in those networks.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ._layers import (
    ConvBnAct,
    build_stacked,
    create_se,
    gate_for,
    make_divisible,
)
from ._registry import register_candidate

__all__ = ["MBConv"]


class MBConv(nn.Module):
    """Depthwise inverted residual block (expansion > 1)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        kernel_size: int = 3,
        expansion: float = 6.0,
        se: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        mid = make_divisible(in_ch * expansion)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.conv_pw = ConvBnAct(in_ch, mid, 1, act=act)
        self.conv_dw = ConvBnAct(mid, mid, kernel_size, stride, groups=mid, act=act)
        self.se = create_se(mid, in_ch, act, gate_for(act)) if se else nn.Identity()
        self.conv_pwl = ConvBnAct(mid, out_ch, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return out + x if self.has_skip else out


# name: (kernel, expansion, se, act, depth)
_VARIANTS: dict[str, tuple[int, int, bool, str, int]] = {
    "mbconv_k3_e3_relu": (3, 3, False, "relu", 1),
    "mbconv_k3_e6_relu": (3, 6, False, "relu", 1),
    "mbconv_k5_e3_relu": (5, 3, False, "relu", 1),
    "mbconv_k5_e6_relu": (5, 6, False, "relu", 1),
    "mbconv_k3_e6_silu": (3, 6, False, "silu", 1),
    "mbconv_k3_e3_se_relu": (3, 3, True, "relu", 1),
    "mbconv_k5_e6_se_silu": (5, 6, True, "silu", 1),
    "mbconv_k3_e3_d2_relu": (3, 3, False, "relu", 2),
}

for _name, (_k, _e, _se, _act, _d) in _VARIANTS.items():
    _tags = {"depthwise", _act, f"k{_k}", f"e{_e}", f"d{_d}"} | ({"se"} if _se else set())
    register_candidate(_name, "mbconv", _tags)(
        partial(build_stacked, MBConv, kernel_size=_k, expansion=_e, se=_se, act=_act, depth=_d)
    )
