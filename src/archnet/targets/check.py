"""Target checks: does an ONNX graph use only the operators and attributes the target runs, and
are the bit widths it declares true?

Chips that accept an operator often accept only some of its forms (Arch-Net's NPUs: 3x3
dense convolutions, 2x2 max-pooling), so besides op types each node is checked against the
target's ``[rules]``. A rule that applies to a node whose value the graph does not show (no
attribute, no initializer, no inferred shape) is reported as unverified, never passed.

Quantized (QDQ) graphs are checked like float ones. ``QuantizeLinear``/``DequantizeLinear`` and
the ``Clip`` that narrows an activation before its ``QuantizeLinear`` only annotate the graph
(an integer compiler folds them into its kernels' scales), so they are never forbidden ops. On
every target, each bit width the model declares is checked against what the graph proves: a
declared grid the graph's integers do not fit is a violation.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from torch import nn

from archnet.quant.export import REPORT_KEY, export_any
from archnet.targets.graph import Graph, module_of
from archnet.targets.qdq import (
    MISMATCH,
    UNVERIFIED,
    QuantizedGraph,
    QuantizedTensor,
    is_annotation,
    read_quantized,
)
from archnet.targets.rules import Finding, Unknown, node_findings
from archnet.targets.target import Target

__all__ = [
    "DECLARED_BITS",
    "CheckReport",
    "Unverified",
    "Violation",
    "check_model",
    "check_report",
    "format_unverified",
    "format_violation",
    "rejects",
]

DECLARED_BITS = "declared_bits"  # the rule name of a declared width


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node; ``module`` points at the PyTorch code to change."""

    node: str
    op_type: str
    reason: str
    attribute: str | None = None  # the offending value, e.g. "kernel_shape=[7, 7]"
    module: str | None = None  # e.g. "blocks.0.conv_pw"; None when the name has no scope

    def __str__(self) -> str:
        return format_violation(self)


@dataclass(frozen=True)
class Unverified:
    """A rule that applies to a node but could not be checked, because the graph does not
    show the value it needs; it passes only where the user allows unverified nodes."""

    node: str
    op_type: str
    rule: str  # the [rules] key, or "declared_bits"
    reason: str  # which value is missing and why
    module: str | None = None

    def __str__(self) -> str:
        return format_unverified(self)


def _where(node: str, op_type: str, module: str | None) -> str:
    scope = f" [from {module}]" if module else ""
    return f"{node or '<unnamed>'} ({op_type}){scope}"


def format_violation(v: Violation) -> str:
    """One line: ``NODE (OP_TYPE) [from MODULE]: REASON``."""
    return f"{_where(v.node, v.op_type, v.module)}: {v.reason}"


def format_unverified(u: Unverified) -> str:
    """One line: ``NODE (OP_TYPE) [from MODULE]: unverified: REASON``."""
    return f"{_where(u.node, u.op_type, u.module)}: unverified: {u.reason}"


@dataclass(frozen=True)
class CheckReport:
    """Everything one check found: broken rules, rules it could not check, and the quantized
    tensors with their proven and declared widths."""

    target: str
    nodes: int  # nodes in the graph
    violations: tuple[Violation, ...]
    unverified: tuple[Unverified, ...]
    tensors: tuple[QuantizedTensor, ...]

    def passed(self, allow_unverified: bool = False) -> bool:
        """No violation, and nothing unverified unless ``allow_unverified``."""
        return not self.violations and (allow_unverified or not self.unverified)


# --- operators and attribute rules ----------------------------------------------------------------


def _show(value: object) -> str:
    """A rule value as written in TOML."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return str([list(v) if isinstance(v, tuple) else v for v in value])
    return f'"{value}"' if isinstance(value, str) else str(value)


def _check_node(
    proto: onnx.NodeProto, graph: Graph, target: Target
) -> list[Violation | Unverified]:
    module = module_of(proto)
    if not target.allows(proto.op_type) and not is_annotation(proto, graph):
        reason = f"operator {proto.op_type} is not allowed by {target.name}"
        return [Violation(proto.name, proto.op_type, reason, module=module)]
    if not target.rules:
        return []
    found: list[Violation | Unverified] = []
    for f in node_findings(proto, graph, target.rules):
        rule = f"({target.name} rules.{f.rule} = {_show(getattr(target.rules, f.rule))})"
        if isinstance(f, Finding):
            message = f.message or f"{f.attribute} is not allowed"
            found.append(
                Violation(proto.name, proto.op_type, f"{message} {rule}", f.attribute, module)
            )
        elif isinstance(f, Unknown):
            found.append(
                Unverified(proto.name, proto.op_type, f.rule, f"{f.message} {rule}", module)
            )
    return found


# --- declared bit widths --------------------------------------------------------------------------

# what to change when a declared width does not hold, per kind of tensor
_FIX = {
    "weight": "store integers within the declared grid",
    "activation": "put a constant Clip to the declared grid before its QuantizeLinear",
}


def _declaration_findings(graph: Graph, quantized: QuantizedGraph) -> list[Violation | Unverified]:
    """A violation for every declared width the graph disproves, an unverified entry for one
    it cannot prove, and a violation for a declaration that names no quantized tensor."""
    found: list[Violation | Unverified] = []
    for t, dq in zip(quantized.tensors, quantized.dequantizers, strict=True):
        status = t.declaration
        if status not in (MISMATCH, UNVERIFIED):
            continue
        q = graph.producer.get(dq.input[0])
        node = q if t.kind == "activation" and q is not None else dq
        readers = graph.consumers.get(dq.output[0], []) if dq.output else []
        module = next((m for r in readers if (m := module_of(r))), None) or module_of(node)
        claim = f"{t.kind} '{t.name}' is declared {t.declared_bits}-bit"
        if status == UNVERIFIED:
            reason = f"{claim} but {t.unread}, so the graph cannot prove it"
            found.append(Unverified(node.name, node.op_type, DECLARED_BITS, reason, module))
        else:
            lo, hi = t.span  # a mismatch is only found on an integer span
            reason = (
                f"{claim} but the graph lets it hold integers in [{lo}, {hi}] ({t.bits} bits); "
                f"{_FIX.get(t.kind, 'correct the model')} or correct its {REPORT_KEY} metadata"
            )
            found.append(Violation(node.name, node.op_type, reason, f"bits={t.bits}", module))
    for name, bits in quantized.stray:
        reason = (
            f"tensor '{name}' is declared {bits}-bit but no DequantizeLinear restores it; "
            f"correct the model's {REPORT_KEY} metadata"
        )
        found.append(Violation(REPORT_KEY, "metadata", reason, f"{DECLARED_BITS}={bits}"))
    return found


# --- entry points ---------------------------------------------------------------------------------


def check_report(model: onnx.ModelProto, target: Target) -> CheckReport:
    """Check every node a compiler keeps (``Identity`` and constant subgraphs are removed)
    against the target's operators and rules, and every declared bit width against the graph.
    """
    graph = Graph(model)
    found: list[Violation | Unverified] = []
    if target.allowed_ops is not None or target.rules:
        for proto in graph.kept_nodes():
            found.extend(_check_node(proto, graph, target))
    quantized = read_quantized(graph)
    found.extend(_declaration_findings(graph, quantized))
    return CheckReport(
        target=target.name,
        nodes=len(model.graph.node),
        violations=tuple(f for f in found if isinstance(f, Violation)),
        unverified=tuple(f for f in found if isinstance(f, Unverified)),
        tensors=quantized.tensors,
    )


def check_model(model: onnx.ModelProto, target: Target) -> list[Violation]:
    """Every broken operator or attribute rule in graph order (a node may break several), then
    every declared bit width the graph disproves. What could not be verified is in
    ``check_report``."""
    return list(check_report(model, target).violations)


def rejects(target: Target, module: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Why ``module`` cannot enter a pool for ``target``, or None: checked on its own export,
    where a rule that could not be verified is a reason too. An open target runs everything,
    and archnet's own export declares only widths it stores, so nothing is exported for it."""
    if target.allowed_ops is None and not target.rules:
        return None
    report = check_report(export_any(module, input_shape), target)
    reasons = {v.reason for v in report.violations}
    reasons |= {f"unverified: {u.reason}" for u in report.unverified}
    return "; ".join(sorted(reasons)) or None
