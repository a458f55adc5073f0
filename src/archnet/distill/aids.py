"""Arch-Net's training-only aids, one pair per feature layout.

* Teacher Attention: an SE-style gate computed from the teacher's feature re-weights the
  student's block output channels, so later student blocks train on cleaner inputs while the
  earlier ones are still catching up.
* Residual Feature Adaptation: the feature loss compares ``a(s)`` with the teacher, so a small
  local mismatch the restricted student operation cannot express is absorbed by the adapter
  instead of pulling the block away from what it can learn.

NCHW features get the paper's convolutional pair; channels-last features (tokens, NHWC,
vectors) a fully connected gate and the linear bottleneck adapter of Arch-Net's Transformer code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AIDS", "LAYOUT_OF_RANK", "ResidualAdapter", "TeacherGate", "TokenAdapter", "TokenGate"]


class TeacherGate(nn.Module):
    """SE-style channel gate from the teacher's feature: ``g = 2 * sigmoid(W2 relu(W1 GAP(t)))``.

    ``W2`` and its bias start at zero, so ``g == 1`` exactly and the student starts unperturbed;
    the factor 2 lets the gate amplify channels as well as damp them.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, teacher_feature: torch.Tensor) -> torch.Tensor:
        z = teacher_feature.mean(dim=(2, 3), keepdim=True)
        return 2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(z))))


class ResidualAdapter(nn.Module):
    """``a(s) = s + conv3x3(s)``, zero-initialised so it starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s + self.conv(s)


class TokenGate(nn.Module):
    """Teacher Attention for channels-last features (tokens, NHWC, vectors): the same gate with
    fully connected layers, from the teacher's mean over every axis but batch and channels."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, teacher_feature: torch.Tensor) -> torch.Tensor:
        axes = tuple(range(1, teacher_feature.dim() - 1))
        z = teacher_feature.mean(dim=axes, keepdim=True) if axes else teacher_feature
        return 2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(z))))


class TokenAdapter(nn.Module):
    """Residual Feature Adaptation for channels-last features, as Arch-Net's Transformer code
    does it: a linear bottleneck ``s + W3 W2 W1 s`` (d -> d/16 -> d/16 -> d), ``W3`` zero."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.down, self.mid = nn.Linear(channels, hidden), nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s + self.up(self.mid(self.down(s)))


# Per block layout: (gate, adapter, channel axis); NCHW keeps the paper's convolutional pair.
AIDS: dict[str, tuple[type[nn.Module], type[nn.Module], int]] = {
    "nchw": (TeacherGate, ResidualAdapter, 1),
    "nhwc": (TokenGate, TokenAdapter, -1),
    "tokens": (TokenGate, TokenAdapter, -1),
    "vector": (TokenGate, TokenAdapter, -1),
}
LAYOUT_OF_RANK = {4: "nchw", 3: "tokens", 2: "vector"}
