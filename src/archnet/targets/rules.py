"""The attribute rules of a target, per ONNX op type, and the readers of the values they check.

A reader returns the value, ``None`` where the rule does not apply (a MatMul with a 1-D
operand has no output feature axis), or ``Unread`` when the graph does not show the value
(no attribute, no initializer, no inferred shape). A rule never guesses: an unread value
becomes an ``Unknown`` finding, which the checker reports as unverified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import onnx

from archnet.targets.graph import Graph, get_attr
from archnet.targets.qdq import float_inputs
from archnet.targets.target import Rules

__all__ = ["CHECKS", "Finding", "Unknown", "Unread", "node_findings"]


@dataclass(frozen=True)
class Unread:
    """A value a rule needs that the graph does not show, and why."""

    reason: str


@dataclass(frozen=True)
class Finding:
    """A broken rule."""

    rule: str  # key in the [rules] table
    attribute: str  # the offending value, e.g. "kernel_shape=[7, 7]"
    message: str | None = None  # what is wrong, when "ATTRIBUTE is not allowed" does not say


@dataclass(frozen=True)
class Unknown:
    """A rule that applies to a node but could not be checked."""

    rule: str
    message: str  # which value is missing and why, e.g. "kernel_shape unknown: ..."


@dataclass(frozen=True)
class _Node:
    proto: onnx.NodeProto
    graph: Graph

    def attr(self, name: str) -> object | None:
        return get_attr(self.proto, name)

    def tensor(self, index: int) -> str:
        """Input ``index``'s name, or "" when the node has no such input; -1 is the output."""
        names = self.proto.output if index == -1 else self.proto.input
        index = 0 if index == -1 else index
        return names[index] if index < len(names) else ""

    def dim(self, *options: tuple[int, int, int]) -> int | Unread:
        """The first known size among ``(tensor index, axis, factor)`` options: axis ``axis``
        of input ``tensor index`` (-1: the output), times ``factor``."""
        for index, axis, factor in options:
            name = self.tensor(index)
            shape = self.graph.shape(name) if name else None
            if shape is not None and -len(shape) <= axis < len(shape) and shape[axis] is not None:
                return int(shape[axis]) * factor
        names = [n for index, _, _ in options if (n := self.tensor(index))]
        return Unread(self.graph.why_unknown(names[-1]) if names else "the node has no inputs")


Value = int | None | Unread


def _conv_kernel(node: _Node) -> list[int] | Unread:
    kernel = node.attr("kernel_shape")
    if kernel is not None:
        return list(kernel)
    name = node.tensor(1)
    weight = node.graph.shape(name) if name else None
    if weight is None or len(weight) < 3 or None in weight[2:]:
        reason = node.graph.why_unknown(name) if name else "the node has no weight input"
        return Unread(f"no kernel_shape attribute and {reason}")
    return [int(k) for k in weight[2:]]


def _spatial_rank(node: _Node) -> int | Unread:
    """Spatial axes: the kernel's, else the data input's rank less batch and channels."""
    kernel = _conv_kernel(node) if node.proto.op_type == "Conv" else node.attr("kernel_shape")
    if isinstance(kernel, list | tuple):
        return len(kernel)
    shape = node.graph.shape(node.tensor(0))
    if shape is not None:
        return len(shape) - 2
    return Unread(f"no kernel_shape attribute and {node.graph.why_unknown(node.tensor(0))}")


def _ones_default(name: str) -> Callable[[_Node], list[int] | Unread]:
    """Strides and dilations default to 1 along every spatial axis (ONNX spec)."""

    def read(node: _Node) -> list[int] | Unread:
        value = node.attr(name)
        if value is not None:
            return list(value)
        rank = _spatial_rank(node)
        return rank if isinstance(rank, Unread) else [1] * rank

    return read


def _group(node: _Node) -> int:
    group = node.attr("group")
    return int(group) if group is not None else 1


def _conv_channels(node: _Node) -> tuple[Value, Value]:
    """(input, output) channels: the weight [out, in / group, kh, kw], else the tensors."""
    c_in = node.dim((1, 1, _group(node)), (0, 1, 1))
    return c_in, node.dim((1, 0, 1), (-1, 1, 1))


def _gemm_features(node: _Node) -> tuple[Value, Value]:
    """(K, N) of A [M, K] (or [K, M], transA) times B [K, N] (or [N, K], transB)."""
    k_axis, n_axis = (1, 0) if node.attr("transB") else (0, 1)
    k = node.dim((1, k_axis, 1), (0, 0 if node.attr("transA") else 1, 1))
    return k, node.dim((1, n_axis, 1), (-1, -1, 1))


def _matmul_features(node: _Node) -> tuple[Value, Value]:
    """(K, N) of [..., M, K] times [..., K, N]; a 1-D B has no N."""
    b = node.graph.shape(node.tensor(1))
    if b is not None and len(b) == 1:
        return node.dim((1, 0, 1)), None
    return node.dim((1, -2, 1), (0, -1, 1)), node.dim((1, -1, 1), (-1, -1, 1))


_Result = Finding | Unknown
_Check = Callable[[_Node, Rules], Iterator[_Result]]


def _pairs(rule: str, name: str, read: Callable[[_Node], object]) -> _Check:
    """A rule that lists the allowed [h, w] values of one attribute."""

    def check(node: _Node, rules: Rules) -> Iterator[_Result]:
        allowed = getattr(rules, rule)
        if allowed is None:
            return
        value = read(node)
        if isinstance(value, Unread):
            yield Unknown(rule, f"{name} unknown: {value.reason}")
        elif tuple(value) not in allowed:
            yield Finding(rule, f"{name}={value}")

    return check


# conv_groups: whether a Conv with ``group`` groups and ``channels`` input channels may run;
# None when the answer needs the channel count and the graph does not show it
_GROUPS: dict[str, Callable[[int, int | None], bool | None]] = {
    "dense": lambda group, channels: group == 1,
    "depthwise": lambda group, channels: (
        group == 1 or (None if channels is None else channels == group)
    ),
    "any": lambda group, channels: True,
}


def _conv_groups(node: _Node, rules: Rules) -> Iterator[_Result]:
    if rules.conv_groups is None:
        return
    group = _group(node)
    channels = _conv_channels(node)[0] if group != 1 else None
    allowed = _GROUPS[rules.conv_groups](group, channels if isinstance(channels, int) else None)
    if allowed is None:
        reason = channels.reason if isinstance(channels, Unread) else "unknown"
        yield Unknown("conv_groups", f"in_channels unknown for group={group}: {reason}")
    elif not allowed:
        yield Finding("conv_groups", f"group={group}")


def _max_channels(read: Callable[[_Node], tuple[Value, Value]], names: tuple[str, str]) -> _Check:
    """A max_channels check on the (input, output) sizes that ``read`` finds."""

    def check(node: _Node, rules: Rules) -> Iterator[_Result]:
        if rules.max_channels is None:
            return
        for name, size in zip(names, read(node), strict=True):
            if isinstance(size, Unread):
                yield Unknown("max_channels", f"{name} unknown: {size.reason}")
            elif size is not None and size > rules.max_channels:
                yield Finding("max_channels", f"{name}={size}")

    return check


def _quantized_only(node: _Node, rules: Rules) -> Iterator[_Result]:
    """Integer-only chips have no float multipliers: both operands must be dequantized ints."""
    if not rules.quantized_only:
        return
    for name in float_inputs(node.proto, node.graph):
        message = f"float compute: input '{name}' is not dequantized from an integer tensor"
        yield Finding("quantized_only", f"input={name}", message)


def _softmax_axis(node: _Node, rules: Rules) -> Iterator[_Result]:
    """Softmax over the last axis only: the attention row a chip's softmax unit reduces."""
    if not rules.softmax_last_axis:
        return
    axis = node.attr("axis")
    if axis is None:  # the default: -1 from opset 13, 1 (a flattening softmax) before
        opset = next(
            (o.version for o in node.graph.model.opset_import if o.domain in ("", "ai.onnx")), 13
        )
        axis = -1 if opset >= 13 else 1
    axis = int(axis)
    if axis == -1:
        return
    shape = node.graph.shape(node.tensor(0))
    if shape is None:
        yield Unknown("softmax_last_axis", f"axis={axis}: {node.graph.why_unknown(node.tensor(0))}")
    elif axis != len(shape) - 1:
        yield Finding(
            "softmax_last_axis",
            f"axis={axis}",
            f"axis={axis} of a rank-{len(shape)} input is not the last",
        )


def _matmul_rank(node: _Node, rules: Rules) -> Iterator[_Result]:
    """Batched matrix products up to ``matmul_max_rank`` axes (e.g. 4: batch, heads, rows, cols)."""
    if rules.matmul_max_rank is None:
        return
    for index in (0, 1):
        name = node.tensor(index)
        shape = node.graph.shape(name) if name else None
        if shape is None:
            yield Unknown(
                "matmul_max_rank", f"rank of '{name}' unknown: {node.graph.why_unknown(name)}"
            )
        elif len(shape) > rules.matmul_max_rank:
            yield Finding("matmul_max_rank", f"rank={len(shape)}")


def _pool_kernel(node: _Node) -> list[int] | Unread:
    kernel = node.attr("kernel_shape")  # required by the ONNX spec
    if kernel is None:
        return Unread("no kernel_shape attribute")
    return list(kernel)


_POOL: tuple[_Check, ...] = (
    _pairs("pool_kernel_shapes", "kernel_shape", _pool_kernel),
    _pairs("pool_strides", "strides", _ones_default("strides")),
)


# Attribute checks per ONNX op type (global pooling has no window, so it is exempt).
CHECKS: dict[str, Sequence[_Check]] = {
    "Conv": (
        _pairs("conv_kernel_shapes", "kernel_shape", _conv_kernel),
        _pairs("conv_strides", "strides", _ones_default("strides")),
        _pairs("conv_dilations", "dilations", _ones_default("dilations")),
        _conv_groups,
        _max_channels(_conv_channels, ("in_channels", "out_channels")),
        _quantized_only,
    ),
    "ConvTranspose": (_quantized_only,),
    "MaxPool": _POOL,
    "AveragePool": _POOL,
    "Gemm": (_max_channels(_gemm_features, ("in_features", "out_features")), _quantized_only),
    "MatMul": (
        _max_channels(_matmul_features, ("in_features", "out_features")),
        _matmul_rank,
        _quantized_only,
    ),
    "Softmax": (_softmax_axis,),
}


def node_findings(proto: onnx.NodeProto, graph: Graph, rules: Rules) -> Iterator[_Result]:
    """Every broken rule (``Finding``) and every rule that could not be checked (``Unknown``)
    at one node, in the order of ``CHECKS``."""
    node = _Node(proto, graph)
    for check in CHECKS.get(proto.op_type, ()):
        yield from check(node, rules)
