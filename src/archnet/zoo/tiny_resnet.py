"""A small ResNet-style teacher for 32x32 inputs, laid out like timm's ResNet.

Block names follow timm (`layer1.0`, `layer1.1`, ...), so code that locates blocks in real
ResNets is exercised by this teacher too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from archnet.zoo.registry import register_model

__all__ = ["BasicBlock", "TinyResNet", "tiny_resnet"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a strided 1x1 conv downsamples the shortcut if needed."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class TinyResNet(nn.Module):
    """7x7 stem + max-pool, `layer1..layerN` stages of BasicBlocks, global pool, fc."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        stem_chs: int = 16,
        channels: Sequence[int] = (16, 32, 64),
        depths: Sequence[int] = (2, 2, 2),
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        # Stride-1 stem: on 32x32 inputs a stride-2 stem plus pool would leave too little space.
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, 1, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = stem_chs
        self.stage_names: list[str] = []
        for i, (out, depth) in enumerate(zip(channels, depths, strict=True)):
            stride = 1 if i == 0 else 2
            stage = nn.Sequential(
                *[
                    BasicBlock(c if j == 0 else out, out, stride if j == 0 else 1)
                    for j in range(depth)
                ]
            )
            name = f"layer{i + 1}"
            self.add_module(name, stage)
            self.stage_names.append(name)
            c = out
        self.num_features = c
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(c, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for name in self.stage_names:
            for block in getattr(self, name):
                nn.init.zeros_(block.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.flatten(self.global_pool(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def tiny_resnet(num_classes: int = 10, **kwargs) -> TinyResNet:
    """ResNet-style teacher for 3x32x32 inputs: 3 stages of 2 BasicBlocks (layer1.0 ...)."""
    return TinyResNet(num_classes=num_classes, **kwargs)
