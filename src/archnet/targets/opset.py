"""Operator-set checks: does an ONNX graph use only what the target runs?"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from torch import nn

from archnet.onnx_utils import export_onnx
from archnet.targets.target import Target


@dataclass(frozen=True)
class Violation:
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node or '<unnamed>'} ({self.op_type}): {self.reason}"


def check_model(model: onnx.ModelProto, target: Target) -> list[Violation]:
    """Every node whose operator type the target does not allow."""
    if target.allowed_ops is None:
        return []
    return [
        Violation(n.name, n.op_type, f"operator {n.op_type} is not allowed by {target.name}")
        for n in model.graph.node
        if n.op_type not in target.allowed_ops
    ]


def rejects(target: Target, module: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Why ``module`` cannot enter a pool for ``target``, or None: checked on its own export."""
    if target.allowed_ops is None:
        return None
    violations = check_model(export_onnx(module, input_shape), target)
    if not violations:
        return None
    return "; ".join(sorted({v.reason for v in violations}))
