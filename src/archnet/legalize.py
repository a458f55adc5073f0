"""Exact rewrites of shell layers that a restricted target cannot run as they are, registered
with :mod:`archnet.opconvert` like every converter.

Each keeps the function the layer computes (``archnet plan`` compares every rewrite with the
teacher's layer on its own input and says "exact" only where the outputs agree):

=====================================  =====================================================
teacher layer                          replacement
=====================================  =====================================================
RepVGG / MobileOne-style multi-branch  one conv: timm's own ``reparameterize()`` folds the
block (3x3 + 1x1 + identity, each       parallel branches and their batch norms into the
with BN, summed)                       3x3 kernel (exact)
``nn.Linear`` without a bias            the same layer with a zero bias: exports as Gemm, not
                                       MatMul (exact)
a channel split (timm's CSP             a 3x3 convolution per part with one-hot centre taps
``CrossStage``: ``x.split(c, dim=1)``)  picking its channels (exact)
=====================================  =====================================================
"""

from __future__ import annotations

import copy

import torch
from timm.models.cspnet import CrossStage
from torch import nn

from archnet.opconvert import register_converter, register_rewrite

__all__ = [
    "SplitFreeCrossStage",
    "channel_picker",
    "reparameterized",
    "split_free_cross_stage",
    "with_zero_bias",
]


@register_converter("RepVggBlock", "MobileOneBlock")
def reparameterized(module: nn.Module) -> nn.Module | None:
    """The block with its branches folded into one conv (timm's ``reparameterize``)."""
    if not callable(getattr(module, "reparameterize", None)):
        return None
    folded = copy.deepcopy(module).eval()
    with torch.no_grad():
        folded.reparameterize()
    return folded


@register_converter(nn.Linear)
def with_zero_bias(module: nn.Linear) -> nn.Linear | None:
    """A bias-free Linear with a zero bias (Gemm in ONNX); None when it has one already."""
    if module.bias is not None:
        return None
    new = nn.Linear(module.in_features, module.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(module.weight)
        new.bias.zero_()
    return new


def channel_picker(channels: int, lo: int, hi: int) -> nn.Conv2d:
    """A 3x3 convolution whose output is input channels ``lo:hi``: one-hot centre taps."""
    conv = nn.Conv2d(channels, hi - lo, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for out, c in enumerate(range(lo, hi)):
            conv.weight[out, c, 1, 1] = 1.0
    return conv.requires_grad_(False)


class SplitFreeCrossStage(CrossStage):
    """timm's ``CrossStage`` whose channel split is two one-hot convs (``pick_cross``,
    ``pick_blocks``): the same function, in operators a restricted target runs."""

    def forward(self, x):
        x = self.conv_exp(self.conv_down(x))
        xs, xb = self.pick_cross(x), self.pick_blocks(x)
        xb = self.conv_transition_b(self.blocks(xb)).contiguous()
        return self.conv_transition(torch.cat([xs, xb], dim=1))


@register_rewrite("CrossStage")
def split_free_cross_stage(stage: nn.Module) -> list[tuple[str, str, str]]:
    """timm's CSP stage without its channel split: the two halves picked by one-hot convs
    (frozen: they select, they do not learn)."""
    if type(stage) is not CrossStage:
        return []
    half = stage.expand_chs // 2
    stage.pick_cross = channel_picker(stage.expand_chs, 0, half)
    stage.pick_blocks = channel_picker(stage.expand_chs, half, stage.expand_chs)
    stage.__class__ = SplitFreeCrossStage
    return [("", "CrossStage: Split (channels)", "2 x Conv2d 3x3, one-hot centre taps")]
