"""``archnet_teacher``: the teacher's own block on a restricted target's operators.

Arch-Net mode cannot keep a teacher block as it is when it holds what the target does not run
(a residual Add, a 1x1 downsample, a channel split, a SiLU). This candidate is that block
converted exactly as the student's shell is: shape-dependent exact rewrites, every layer
converted by ``opconvert``, then its functional glue legalized by ``archnet.glue`` (an Add as
one 3x3 conv over a concat, ...). Where those rewrites are exact it starts as the teacher's
block; where they are not (activations, norms) blockwise distillation trains it back. The
target check still decides: a block whose glue has no rewrite (an SE gate's product) is
refused like any candidate. Blocks with kernels above 3x3 are left to the other candidates:
their 3x3 stacks are least-squares fits, slow to build on wide layers and no longer the
teacher's block.
"""

from __future__ import annotations

import copy

from torch import nn

from archnet.blocks import BlockSpec

from ._layers import conv_stride
from ._registry import register_candidate


@register_candidate(
    "archnet_teacher", "archnet", {"archnet", "restricted", "teacher"}, from_teacher=True
)
def legalized_teacher(spec: BlockSpec, teacher: nn.Module | None) -> nn.Module | None:
    stride = conv_stride(spec)
    if teacher is None or spec.context or not isinstance(stride, int) or not stride:
        # no block to convert; context inputs are not traced here; (h, w) factors that differ
        # have no 3x3 stride 1 or 2 form, as for the family's other candidates
        return None
    if any(isinstance(m, nn.Conv2d) and max(m.kernel_size) > 3 for m in teacher.modules()):
        return None  # 5x5 / 7x7 kernels become fitted 3x3 stacks: costly, and not the teacher
    from archnet.plan import restrict

    return restrict(copy.deepcopy(teacher).eval(), [], (1, *spec.in_shape))[0]
