"""Skip candidates: (nearly) remove the block.

Deep teachers often have blocks a student can drop. Identity when the block keeps its
shape (in any layout, tokens included); otherwise the cheapest shape fix: a stride-s 1x1 conv + BN (``skip``), or an s x s
average pool followed, if channels change, by a 1x1 conv + BN (``skip_pool``, which sees
every input pixel rather than one in s^2).
"""

from __future__ import annotations

from torch import nn

from archnet.blocks import LAYOUTS, BlockSpec

from ._layers import ConvBnAct, conv_stride
from ._registry import register_candidate


@register_candidate("skip", "skip", {"skip"}, layouts=LAYOUTS)
def _skip(spec: BlockSpec) -> nn.Module | None:
    if spec.same_shape:
        return nn.Identity()
    stride = conv_stride(spec) if spec.layout == "nchw" else 0
    if not stride:
        return None
    return ConvBnAct(spec.in_ch, spec.out_ch, 1, stride, act=None)


@register_candidate("linear", "skip", {"skip", "linear"}, layouts=("nhwc", "tokens", "vector"))
def _linear(spec: BlockSpec) -> nn.Module | None:
    """One linear map over the channels of every position: the cheapest replacement that still
    mixes channels (Puzzle's "linear" block), for channels-last streams of unchanged extent."""
    if spec.in_shape[:-1] != spec.out_shape[:-1]:
        return None
    return nn.Linear(spec.in_ch, spec.out_ch)


@register_candidate("skip_pool", "skip", {"skip", "pool"})
def _skip_pool(spec: BlockSpec) -> nn.Module | None:
    """Only for down-sampling blocks; at stride 1 it would duplicate ``skip``."""
    stride = conv_stride(spec)
    if stride in (0, 1, (1, 1)):
        return None
    pool = nn.AvgPool2d(stride, stride)
    if spec.in_ch == spec.out_ch:
        return pool
    return nn.Sequential(pool, ConvBnAct(spec.in_ch, spec.out_ch, 1, act=None))
