"""Target checks: does an ONNX graph use only the operators and attributes the target runs?

Chips that accept an operator often accept only some of its forms (Arch-Net's NPUs: 3x3
dense convolutions, 2x2 max-pooling), so besides op types each node is checked against the
target's ``[rules]``. Only what the graph shows is checked: a value that can be read neither
from an attribute, an initializer nor shape inference is not reported.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import onnx
from torch import nn

from archnet.onnx_utils import export_onnx
from archnet.targets.target import Rules, Target

__all__ = ["Violation", "check_model", "format_violation", "module_of", "rejects"]

Shape = tuple[int | None, ...]


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


def format_violation(v: Violation) -> str:
    """One line: ``NODE (OP_TYPE) [from MODULE]: REASON``."""
    where = f" [from {v.module}]" if v.module else ""
    return f"{v.node or '<unnamed>'} ({v.op_type}){where}: {v.reason}"


# --- where a node came from ------------------------------------------------------------------


def _join_scope(parent: str, scope: str) -> str:
    """Append one exporter scope to a module path.

    The TorchScript exporter shortens each scope to the module's last non-numeric name atom
    plus any indices, so ``blocks.0`` inside ``blocks`` appears as ``blocks.0``, not ``0``.
    """
    if not parent:
        return scope
    prefix, _, last = scope.rpartition(".")
    if prefix and last.isdigit() and (parent == prefix or parent.endswith(f".{prefix}")):
        return f"{parent}.{last}"
    return f"{parent}.{scope}"


def _module_from_name(node: onnx.NodeProto) -> str | None:
    """TorchScript exporter names: ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``."""
    if not node.name.startswith("/"):
        return None
    path = ""
    for scope in node.name.split("/")[1:-1]:
        if scope:
            path = _join_scope(path, scope)
    return path or None


def _module_from_metadata(node: onnx.NodeProto) -> str | None:
    """Dynamo exporter: names are flat (``node_conv2d``) but metadata keeps the module path."""
    for prop in node.metadata_props:
        if prop.key != "pkg.torch.onnx.name_scopes":
            continue
        try:
            scopes = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError):
            return None
        if isinstance(scopes, list) and len(scopes) > 2:  # ["", module scopes..., the op]
            return str(scopes[-2]) or None
        return None
    return None


# tried in order; the first that knows wins
_MODULE_SOURCES: tuple[Callable[[onnx.NodeProto], str | None], ...] = (
    _module_from_metadata,
    _module_from_name,
)


def module_of(node: onnx.NodeProto) -> str | None:
    """The PyTorch module a node was exported from, or None when the node does not say."""
    for source in _MODULE_SOURCES:
        module = source(node)
        if module:
            return module
    return None


# --- shapes and attributes ---------------------------------------------------------------------


def _dims(value: onnx.ValueInfoProto) -> Shape | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    )


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # an invalid graph still gets its op and attribute checks
        graph = model.graph
    values = [*graph.input, *graph.value_info, *graph.output]
    return {v.name: dims for v in values if (dims := _dims(v)) is not None}


# Ops that compute nothing: every deployment compiler removes them. The exporter emits an
# Identity for a shared initializer, or for a module that returns its input (a skipped block).
_ALIAS_OPS = frozenset({"Identity"})


def _removed_nodes(model: onnx.ModelProto) -> set[int]:
    """Indices of nodes no chip ever runs: aliases, and nodes computed from constants alone
    (folded at compile time)."""
    constant = {t.name for t in model.graph.initializer}
    removed: set[int] = set()
    for i, node in enumerate(model.graph.node):
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(name in constant for name in inputs)):
            removed.add(i)
            constant.update(node.output)
        elif node.op_type in _ALIAS_OPS:
            removed.add(i)
    return removed


class _Graph:
    """Tensor shapes: initializer dims first, shape inference only when a rule needs it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self._known: dict[str, Shape] = {t.name: tuple(t.dims) for t in model.graph.initializer}
        for node in model.graph.node:  # shared weights reach a Conv through an Identity
            if node.op_type == "Identity" and node.input and node.input[0] in self._known:
                self._known[node.output[0]] = self._known[node.input[0]]
        self._inferred = False

    def shape(self, name: str) -> Shape | None:
        if name not in self._known and not self._inferred:
            self._known = {**_inferred_shapes(self.model), **self._known}
            self._inferred = True
        return self._known.get(name)


@dataclass(frozen=True)
class _Node:
    proto: onnx.NodeProto
    graph: _Graph

    def attr(self, name: str) -> object | None:
        for a in self.proto.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return None

    def shape(self, index: int) -> Shape | None:
        if index >= len(self.proto.input) or not self.proto.input[index]:
            return None
        return self.graph.shape(self.proto.input[index])

    def out_shape(self) -> Shape | None:
        return self.graph.shape(self.proto.output[0]) if self.proto.output else None


def _at(shape: Shape | None, index: int) -> int | None:
    if shape is None or not -len(shape) <= index < len(shape):
        return None
    return shape[index]


def _conv_kernel(node: _Node) -> list[int] | None:
    kernel = node.attr("kernel_shape")
    if kernel is not None:
        return list(kernel)
    weight = node.shape(1)
    if weight is None or len(weight) < 3 or None in weight[2:]:
        return None
    return [int(k) for k in weight[2:]]


def _spatial_rank(node: _Node) -> int:
    kernel = _conv_kernel(node) if node.proto.op_type == "Conv" else node.attr("kernel_shape")
    return len(kernel) if kernel else 2


def _ones_default(name: str) -> Callable[[_Node], list[int] | None]:
    """Strides and dilations default to 1 along every spatial axis (ONNX spec)."""

    def read(node: _Node) -> list[int] | None:
        value = node.attr(name)
        return list(value) if value is not None else [1] * _spatial_rank(node)

    return read


def _group(node: _Node) -> int:
    group = node.attr("group")
    return int(group) if group is not None else 1


def _conv_channels(node: _Node) -> tuple[int | None, int | None]:
    weight = node.shape(1)  # [out, in / group, kh, kw]
    in_per_group = _at(weight, 1)
    c_in = in_per_group * _group(node) if in_per_group else _at(node.shape(0), 1)
    c_out = _at(weight, 0) or _at(node.out_shape(), 1)
    return c_in, c_out


def _gemm_features(node: _Node) -> tuple[int | None, int | None]:
    b = node.shape(1)  # [K, N], or [N, K] with transB
    if node.attr("transB"):
        k, n = _at(b, 1), _at(b, 0)
    else:
        k, n = _at(b, 0), _at(b, 1)
    k = k or _at(node.shape(0), 0 if node.attr("transA") else 1)  # A: [M, K] or [K, M]
    return k, n or _at(node.out_shape(), -1)


def _matmul_features(node: _Node) -> tuple[int | None, int | None]:
    b = node.shape(1)  # [..., K, N]
    if b is not None and len(b) == 1:
        return b[0], None
    k = _at(b, -2) or _at(node.shape(0), -1)
    return k, _at(b, -1) or _at(node.out_shape(), -1)


# --- rules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Finding:
    rule: str  # key in the [rules] table
    attribute: str  # the offending value, e.g. "kernel_shape=[7, 7]"


_Check = Callable[[_Node, Rules], Iterator[_Finding]]


def _pairs(rule: str, name: str, read: Callable[[_Node], list[int] | None]) -> _Check:
    """A rule that lists the allowed [h, w] values of one attribute."""

    def check(node: _Node, rules: Rules) -> Iterator[_Finding]:
        allowed = getattr(rules, rule)
        value = read(node) if allowed is not None else None
        if value is not None and tuple(value) not in allowed:
            yield _Finding(rule, f"{name}={value}")

    return check


# conv_groups: whether a Conv with ``group`` groups and ``channels`` input channels may run
_GROUPS: dict[str, Callable[[int, int | None], bool]] = {
    "dense": lambda group, channels: group == 1,
    "depthwise": lambda group, channels: group == 1 or channels in (None, group),
    "any": lambda group, channels: True,
}


def _conv_groups(node: _Node, rules: Rules) -> Iterator[_Finding]:
    if rules.conv_groups is None:
        return
    group = _group(node)
    if not _GROUPS[rules.conv_groups](group, _conv_channels(node)[0]):
        yield _Finding("conv_groups", f"group={group}")


def _max_channels(
    read: Callable[[_Node], tuple[int | None, int | None]], names: tuple[str, str]
) -> _Check:
    """A max_channels check on the (input, output) sizes that ``read`` finds."""

    def check(node: _Node, rules: Rules) -> Iterator[_Finding]:
        if rules.max_channels is None:
            return
        for name, size in zip(names, read(node), strict=True):
            if size is not None and size > rules.max_channels:
                yield _Finding("max_channels", f"{name}={size}")

    return check


_POOL: tuple[_Check, ...] = (
    _pairs("pool_kernel_shapes", "kernel_shape", lambda node: node.attr("kernel_shape")),
    _pairs("pool_strides", "strides", _ones_default("strides")),
)

# Attribute checks per ONNX op type (global pooling has no window, so it is exempt).
_CHECKS: dict[str, Sequence[_Check]] = {
    "Conv": (
        _pairs("conv_kernel_shapes", "kernel_shape", _conv_kernel),
        _pairs("conv_strides", "strides", _ones_default("strides")),
        _pairs("conv_dilations", "dilations", _ones_default("dilations")),
        _conv_groups,
        _max_channels(_conv_channels, ("in_channels", "out_channels")),
    ),
    "MaxPool": _POOL,
    "AveragePool": _POOL,
    "Gemm": (_max_channels(_gemm_features, ("in_features", "out_features")),),
    "MatMul": (_max_channels(_matmul_features, ("in_features", "out_features")),),
}


def _show(value: object) -> str:
    """A rule value as written in TOML."""
    if isinstance(value, tuple):
        return str([list(v) if isinstance(v, tuple) else v for v in value])
    return f'"{value}"' if isinstance(value, str) else str(value)


def _check_node(node: _Node, target: Target) -> Iterator[Violation]:
    proto = node.proto
    if not target.allows(proto.op_type):
        reason = f"operator {proto.op_type} is not allowed by {target.name}"
        yield Violation(proto.name, proto.op_type, reason, module=module_of(proto))
        return
    if not target.rules:
        return
    for check in _CHECKS.get(proto.op_type, ()):
        for f in check(node, target.rules):
            allowed = _show(getattr(target.rules, f.rule))
            reason = f"{f.attribute} is not allowed ({target.name} rules.{f.rule} = {allowed})"
            yield Violation(proto.name, proto.op_type, reason, f.attribute, module_of(proto))


def check_model(model: onnx.ModelProto, target: Target) -> list[Violation]:
    """Every broken operator or attribute rule, in graph order (a node may break several).

    Nodes a compiler removes (``Identity``, constant subgraphs) are not checked.
    """
    if target.allowed_ops is None and not target.rules:
        return []
    graph = _Graph(model)
    removed = _removed_nodes(model)
    return [
        v
        for i, proto in enumerate(model.graph.node)
        if i not in removed
        for v in _check_node(_Node(proto, graph), target)
    ]


def rejects(target: Target, module: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Why ``module`` cannot enter a pool for ``target``, or None: checked on its own export."""
    if target.allowed_ops is None and not target.rules:
        return None
    violations = check_model(export_onnx(module, input_shape), target)
    if not violations:
        return None
    return "; ".join(sorted({v.reason for v in violations}))
