"""Fused-MBConv candidates: kxk dense expand -> [SE] -> 1x1 project (EfficientNetV2).

Replacing the 1x1 expand + depthwise pair with one dense conv costs more MACs but often runs
faster on GPUs/NPUs, whose depthwise kernels are memory bound. Expansion 1 degenerates to a
single conv-BN-act. Linear output (except e1); identity shortcut only when the block keeps
its shape.
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

__all__ = ["FusedMBConv"]


class FusedMBConv(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        kernel_size: int = 3,
        expansion: float = 4.0,
        se: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_ch == out_ch
        if expansion == 1:  # a single conv; a 1x1 projection after it would add nothing
            self.conv_exp = ConvBnAct(in_ch, out_ch, kernel_size, stride, act=act)
            self.se = nn.Identity()
            self.conv_pwl = nn.Identity()
            return
        mid = make_divisible(in_ch * expansion)
        self.conv_exp = ConvBnAct(in_ch, mid, kernel_size, stride, act=act)
        self.se = create_se(mid, in_ch, act, gate_for(act)) if se else nn.Identity()
        self.conv_pwl = ConvBnAct(mid, out_ch, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_pwl(self.se(self.conv_exp(x)))
        return out + x if self.has_skip else out


# name: (kernel, expansion, se, act, depth)
_VARIANTS: dict[str, tuple[int, int, bool, str, int]] = {
    "fused_k3_e1_relu": (3, 1, False, "relu", 1),
    "fused_k3_e3_relu": (3, 3, False, "relu", 1),
    "fused_k3_e6_silu": (3, 6, False, "silu", 1),
    "fused_k3_e1_d2_relu": (3, 1, False, "relu", 2),
}

for _name, (_k, _e, _se, _act, _d) in _VARIANTS.items():
    _tags = {"dense", _act, f"k{_k}", f"e{_e}", f"d{_d}"} | ({"se"} if _se else set())
    register_candidate(_name, "fused", _tags)(
        partial(
            build_stacked, FusedMBConv, kernel_size=_k, expansion=_e, se=_se, act=_act, depth=_d
        )
    )
