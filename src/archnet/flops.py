"""Parameter and multiply-accumulate counts, the hardware-agnostic cost proxies.

MACs count only the layers that dominate CNN cost: convolutions (grouped and depthwise
included) and linear layers. Elementwise work (activations, BatchNorm, which folds into the
preceding conv at deployment, residual additions, pooling, SE gating) and biases are not
counted.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["count_params", "count_macs"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once), trainable or not."""
    return sum(p.numel() for p in module.parameters())


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, _ConvNd):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        if module.transposed:  # every input element is scattered over a kernel of outputs
            per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
            return inp.numel() * per_input
        return out.numel() * per_output
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at batch size 1.

    ``input_shape`` excludes the batch dimension, e.g. ``(3, 224, 224)``. The module runs in
    eval mode (restored afterwards) so BatchNorm statistics are left untouched.
    """
    ref = next(iter(module.parameters()), None)
    x = torch.zeros(
        1,
        *input_shape,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None and ref.is_floating_point() else None,
    )
    total = 0

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(mod, args[0], out)

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, (_ConvNd, nn.Linear))
    ]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        module(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return total
