"""Reading an ONNX graph the way a deployment compiler sees it.

The checker needs tensor shapes, constant values, who produces and consumes each tensor, which
nodes a compiler removes, and which PyTorch module a node came from. Shapes come from
initializers first and from shape inference only when a rule needs them; when inference fails
the error is kept, so that a node whose value cannot be read says why.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["ALIAS_OPS", "Graph", "Shape", "get_attr", "module_of"]

Shape = tuple[int | None, ...]

# Ops that compute nothing: every deployment compiler removes them. The exporter emits an
# Identity for a shared initializer, or for a module that returns its input (a skipped block).
ALIAS_OPS = frozenset({"Identity"})

# Ops whose output has their first input's shape. Shared weights reach a Conv through an
# Identity; in a QDQ graph the weight is an integer initializer behind a DequantizeLinear (or
# a float one behind QuantizeLinear -> DequantizeLinear), so the kernel shape is read through
# them even where shape inference fails.
_SAME_SHAPE_OPS = frozenset({"Identity", "QuantizeLinear", "DequantizeLinear"})


# --- where a node came from -----------------------------------------------------------------------


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


# --- attributes, shapes, constants ----------------------------------------------------------------


def get_attr(node: onnx.NodeProto, name: str) -> object | None:
    """An attribute's value, or None when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _dims(value: onnx.ValueInfoProto) -> Shape | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    )


@dataclass(frozen=True)
class _Inferred:
    shapes: dict[str, Shape]
    elem_types: dict[str, int]
    error: str | None  # the first line of the inference error, None when inference succeeded


def _infer(model: onnx.ModelProto) -> _Inferred:
    """Shape inference, strict first so that a failure can be named, then lenient so that
    the shapes it could still infer are kept."""
    error = None
    try:
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    except Exception as e:  # an invalid graph still gets its op and attribute checks
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        error = (lines[-1] if lines else type(e).__name__)[:200]
        try:
            graph = onnx.shape_inference.infer_shapes(model).graph
        except Exception:
            graph = model.graph
    values = [*graph.input, *graph.value_info, *graph.output]
    return _Inferred(
        shapes={v.name: dims for v in values if (dims := _dims(v)) is not None},
        elem_types={
            v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")
        },
        error=error,
    )


# Constant node attributes, as tensors (the exporters write "value"; hand-built graphs often
# use the scalar and list forms)
_CONSTANT_VALUES: dict[str, Callable[[object], onnx.TensorProto]] = {
    "value": lambda v: v,
    "value_float": lambda v: numpy_helper.from_array(np.array(v, np.float32)),
    "value_floats": lambda v: numpy_helper.from_array(np.array(v, np.float32)),
    "value_int": lambda v: numpy_helper.from_array(np.array(v, np.int64)),
    "value_ints": lambda v: numpy_helper.from_array(np.array(v, np.int64)),
}


def _constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values by tensor name."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        for a in node.attribute:
            if a.name in _CONSTANT_VALUES:
                value = onnx.helper.get_attribute_value(a)
                tensors[node.output[0]] = _CONSTANT_VALUES[a.name](value)
    return tensors


class Graph:
    """Tensor shapes (initializer dims first, shape inference only when a rule needs it), the
    constants, and who produces and consumes each tensor."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.constants = _constant_tensors(model)
        self._known: dict[str, Shape] = {n: tuple(t.dims) for n, t in self.constants.items()}
        for node in model.graph.node:
            if node.op_type in _SAME_SHAPE_OPS and node.input and node.input[0] in self._known:
                self._known[node.output[0]] = self._known[node.input[0]]
        self.producer: dict[str, onnx.NodeProto] = {
            out: node for node in model.graph.node for out in node.output if out
        }
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.outputs = {v.name for v in model.graph.output}

    @functools.cached_property
    def _inferred(self) -> _Inferred:
        return _infer(self.model)

    def shape(self, name: str) -> Shape | None:
        """A tensor's shape, None when neither the initializers nor shape inference know it."""
        if name in self._known:
            return self._known[name]
        return self._inferred.shapes.get(name)

    def why_unknown(self, name: str) -> str:
        """Why ``shape(name)`` is None, in words for a report."""
        error = self._inferred.error
        if error:
            return f"the shape of '{name}' is unknown (shape inference failed: {error})"
        return f"the shape of '{name}' is unknown (shape inference cannot tell)"

    def elem_type(self, name: str) -> int | None:
        """A tensor's element type: constants directly, the rest by shape inference."""
        if name in self.constants:
            return self.constants[name].data_type
        return self._inferred.elem_types.get(name) or None

    def array(self, name: str) -> np.ndarray | None:
        """A constant tensor's values, or None when the tensor is computed at run time."""
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def resolve(self, name: str) -> str:
        """The tensor ``name`` aliases: Identity nodes are removed by every compiler."""
        node = self.producer.get(name)
        while node is not None and node.op_type in ALIAS_OPS and node.input:
            name = node.input[0]
            node = self.producer.get(name)
        return name

    @functools.cached_property
    def removed(self) -> frozenset[int]:
        """Indices of nodes no chip ever runs: aliases, and nodes computed from constants alone
        (folded at compile time). The ``Shape`` of a tensor whose shape is fixed is such a
        constant (a ViT's class token broadcast to the batch is one in a fixed-shape export)."""
        constant = {t.name for t in self.model.graph.initializer}
        removed: set[int] = set()
        for i, node in enumerate(self.model.graph.node):
            inputs = [name for name in node.input if name]
            if (
                node.op_type == "Constant"
                or (inputs and all(name in constant for name in inputs))
                or (node.op_type == "Shape" and self._static(node.input[0]))
            ):
                removed.add(i)
                constant.update(node.output)
            elif node.op_type in ALIAS_OPS:
                removed.add(i)
        return frozenset(removed)

    def _static(self, name: str) -> bool:
        shape = self.shape(name)
        return shape is not None and None not in shape

    def kept_nodes(self) -> list[onnx.NodeProto]:
        """The nodes a compiler keeps, in graph order."""
        return [n for i, n in enumerate(self.model.graph.node) if i not in self.removed]
