"""A small EfficientNet-style teacher for 32x32 inputs.

It mixes the block kinds a real mobile network has (MBConv with squeeze-excite, 3x3 and 5x5
depthwise kernels, strided blocks, a ConvNeXt-style block with LayerNorm) so that block-wise
distillation meets realistic variety, while staying cheap enough to train on a laptop CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from archnet.zoo.registry import register_model

__all__ = ["ConvNeXtBlock", "LayerNorm2d", "MBConv", "SqueezeExcite", "TinyEffNet", "tiny_effnet"]


class SqueezeExcite(nn.Module):
    """Channel attention from globally pooled features (EfficientNet's SE)."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1)
        self.act = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act(self.conv_reduce(s)))
        return x * s.sigmoid()


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, SE, 1x1 project, skip when shapes match."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
    ) -> None:
        super().__init__()
        mid = int(round(in_chs * expand_ratio))
        self.has_skip = stride == 1 and in_chs == out_chs
        if mid != in_chs:
            self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.act1 = nn.SiLU(inplace=True)
        else:  # depthwise-separable block (EfficientNet's first stage)
            self.conv_pw, self.bn1, self.act1 = nn.Identity(), nn.Identity(), nn.Identity()
        self.conv_dw = nn.Conv2d(
            mid, mid, kernel_size, stride, kernel_size // 2, groups=mid, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.SiLU(inplace=True)
        self.se = SqueezeExcite(mid, max(4, int(in_chs * se_ratio))) if se_ratio else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut if self.has_skip else x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (timm's LayerNorm2d); exports to ONNX."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7, LayerNorm, 1x1 MLP with GELU, layer scale, residual."""

    def __init__(
        self, channels: int, kernel_size: int = 7, mlp_ratio: float = 4.0, ls_init: float = 0.1
    ) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.conv_dw = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels
        )
        self.norm = LayerNorm2d(channels, eps=1e-6)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), ls_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.norm(self.conv_dw(x)))))
        return x + self.gamma * y


# (kind, kernel, stride, expand ratio, out channels); "cn" is a ConvNeXt block.
_ARCH: tuple[tuple[str, int, int, float, int], ...] = (
    ("mb", 3, 1, 1.0, 16),
    ("mb", 3, 2, 4.0, 24),
    ("mb", 5, 1, 4.0, 24),
    ("mb", 5, 2, 4.0, 40),
    ("mb", 5, 1, 4.0, 40),
    ("cn", 7, 1, 4.0, 40),
    ("mb", 3, 2, 4.0, 64),
    ("mb", 5, 1, 4.0, 64),
)


class TinyEffNet(nn.Module):
    """Stem, `blocks` (the units that distillation replaces), then a classifier head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        stem_chs: int = 16,
        stem_stride: int = 2,
        head_chs: int = 128,
        arch: Sequence[tuple[str, int, int, float, int]] = _ARCH,
        width_mult: float = 1.0,
        drop_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes

        def ch(c: int) -> int:
            return max(8, int(round(c * width_mult / 4)) * 4)

        stem_chs = ch(stem_chs)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 5, stem_stride, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.SiLU(inplace=True)

        blocks: list[nn.Module] = []
        c = stem_chs
        for kind, k, s, e, out in arch:
            out = ch(out)
            if kind == "cn":
                if s != 1 or out != c:
                    raise ValueError("ConvNeXt blocks here keep shape: stride 1, same channels")
                blocks.append(ConvNeXtBlock(c, kernel_size=k, mlp_ratio=e))
            else:
                blocks.append(MBConv(c, out, kernel_size=k, stride=s, expand_ratio=e))
            c = out
        self.blocks = nn.Sequential(*blocks)

        self.num_features = ch(head_chs)
        self.conv_head = nn.Conv2d(c, self.num_features, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.num_features)
        self.act2 = nn.SiLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Start residual MBConvs near identity, as timm's zero_init_last does.
        for m in self.blocks:
            if isinstance(m, MBConv) and m.has_skip:
                nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.conv_head(x)))
        x = self.dropout(self.flatten(self.global_pool(x)))
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def tiny_effnet(num_classes: int = 10, **kwargs) -> TinyEffNet:
    """EfficientNet-style teacher for 3x32x32 inputs: stride-2 stem then 8 blocks, 16->8->4->2 spatial."""
    return TinyEffNet(num_classes=num_classes, **kwargs)
