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
=====================================  =====================================================
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from archnet.opconvert import register_converter

__all__ = ["reparameterized", "with_zero_bias"]


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
