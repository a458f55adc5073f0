"""Parameter and multiply-accumulate counts, the hardware-agnostic cost proxies.

MACs are counted at the level of PyTorch's operators (``torch.utils.flop_counter``), so every
matrix product is in: convolutions (grouped, depthwise and transposed included), linear
layers, and the functional ones of attention (QK^T and the weighted sum of values, fused
into scaled-dot-product attention or not). Elementwise work (activations, normalisation,
residual additions, pooling, softmax, SE gating) and biases are not counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_params", "count_macs"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once), trainable or not."""
    return sum(p.numel() for p in module.parameters())


def _cpu_sdpa(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:  # noqa: ANN001
    """FLOPs of the CPU kernel of scaled-dot-product attention, which PyTorch's counter lacks."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}


@contextlib.contextmanager
def _no_attention_fastpath() -> Iterator[None]:
    """Eval-mode ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` otherwise run one
    fused kernel that no counter sees into."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at batch size 1 (half the counted FLOPs).

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
    modes = {m: m.training for m in module.modules()}
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        module.eval()
        with _no_attention_fastpath(), counter:
            module(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return counter.get_total_flops() // 2
