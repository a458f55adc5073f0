"""Target checks: does an ONNX graph use only the operators and attributes the target runs?

Chips that accept an operator often accept only some of its forms (Arch-Net's NPUs: 3x3
dense convolutions, 2x2 max-pooling), so besides op types each node is checked against the
target's ``[rules]``. Only what the graph shows is checked: a value that can be read neither
from an attribute, an initializer nor shape inference is not reported.

Quantized (QDQ) graphs are checked like float ones. ``QuantizeLinear``/``DequantizeLinear`` and
the ``Clip`` that narrows an activation before its ``QuantizeLinear`` only annotate the graph
(an integer compiler folds them into its kernels' scales), so they are never forbidden ops.
``quantized_tensors`` reports what the annotations say, read from the graph alone so that
models from other quantizers are understood too.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from torch import nn

from archnet.targets.target import Rules, Target

__all__ = [
    "COMPUTE_OPS",
    "QuantizedTensor",
    "Violation",
    "check_model",
    "float_compute_nodes",
    "format_violation",
    "module_of",
    "quantized_tensors",
    "rejects",
]

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


# Ops whose output has their first input's shape. Shared weights reach a Conv through an
# Identity; in a QDQ graph the weight is an integer initializer behind a DequantizeLinear (or
# a float one behind QuantizeLinear -> DequantizeLinear), so the kernel shape is read through
# them even where shape inference fails.
_SAME_SHAPE_OPS = frozenset({"Identity", "QuantizeLinear", "DequantizeLinear"})


def _constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values by tensor name."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    tensors[node.output[0]] = a.t
    return tensors


class _Graph:
    """Tensor shapes (initializer dims first, shape inference only when a rule needs it) and
    who produces and consumes each tensor."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self._known: dict[str, Shape] = {t.name: tuple(t.dims) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type in _SAME_SHAPE_OPS and node.input and node.input[0] in self._known:
                self._known[node.output[0]] = self._known[node.input[0]]
        self._inferred = False
        self.constants = _constant_tensors(model)
        self.producer: dict[str, onnx.NodeProto] = {
            out: node for node in model.graph.node for out in node.output if out
        }
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.outputs = {v.name for v in model.graph.output}

    def shape(self, name: str) -> Shape | None:
        if name not in self._known and not self._inferred:
            self._known = {**_inferred_shapes(self.model), **self._known}
            self._inferred = True
        return self._known.get(name)

    @functools.cached_property
    def _elem_types(self) -> dict[str, int]:
        try:
            graph = onnx.shape_inference.infer_shapes(self.model).graph
        except Exception:
            graph = self.model.graph
        values = [*graph.input, *graph.value_info, *graph.output]
        return {
            v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")
        }

    def elem_type(self, name: str) -> int | None:
        """A tensor's element type: constants directly, the rest by shape inference."""
        if name in self.constants:
            return self.constants[name].data_type
        return self._elem_types.get(name) or None

    def array(self, name: str) -> np.ndarray | None:
        """A constant tensor's values, or None when the tensor is computed at run time."""
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def resolve(self, name: str) -> str:
        """The tensor ``name`` aliases: Identity nodes are removed by every compiler."""
        node = self.producer.get(name)
        while node is not None and node.op_type in _ALIAS_OPS and node.input:
            name = node.input[0]
            node = self.producer.get(name)
        return name


def _get_attr(proto: onnx.NodeProto, name: str) -> object | None:
    for a in proto.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


@dataclass(frozen=True)
class _Node:
    proto: onnx.NodeProto
    graph: _Graph

    def attr(self, name: str) -> object | None:
        return _get_attr(self.proto, name)

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


# --- quantization (QDQ) -----------------------------------------------------------------------

# Nodes that do the arithmetic an integer NPU runs in integers (quantized_only checks them).
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
MIN_BITS = 2  # the narrowest width reported: a 1-bit signed grid holds only -1 and 0


def _widths(names: dict[str, int]) -> dict[int, int]:
    """ONNX element type -> bits, for the types the installed onnx knows."""
    return {getattr(TensorProto, n): bits for n, bits in names.items() if hasattr(TensorProto, n)}


_INT_BITS = _widths({f"{sign}INT{bits}": bits for sign in ("", "U") for bits in (2, 4, 8, 16, 32)})
_FLOAT_BITS = _widths(
    {
        "FLOAT4E2M1": 4,
        "FLOAT6E2M3": 6,
        "FLOAT6E3M2": 6,
        "FLOAT8E4M3FN": 8,
        "FLOAT8E4M3FNUZ": 8,
        "FLOAT8E5M2": 8,
        "FLOAT8E5M2FNUZ": 8,
        "FLOAT8E8M0": 8,
    }
)
_UNSIGNED = frozenset(
    getattr(TensorProto, n)
    for n in ("UINT2", "UINT4", "UINT8", "UINT16", "UINT32", "FLOAT8E8M0")
    if hasattr(TensorProto, n)
)


@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor a ``DequantizeLinear`` restores, as an integer compiler would see it.

    ``bits`` can be narrower than the storage type: sub-8-bit tensors are usually kept in int8
    or uint8 (int4 kernels are rare), so the width is read from what the graph restricts: a
    weight's stored integers, or the ``Clip`` in front of an activation's ``QuantizeLinear``.
    """

    name: str  # a weight's integer initializer, or the float tensor an activation quantizes
    kind: str  # "weight" (constant) or "activation" (quantized at run time)
    bits: int  # the narrowest signed/unsigned width that holds the values (at least 2)
    storage: str  # the stored element type: "int8", "uint8", "int4", "int32", ...
    signed: bool
    per_channel: bool  # one scale per channel (or block) rather than one for the tensor
    consumer: str  # op types that read the dequantized tensor, e.g. "Conv"; "" when none


def _quantize_output_type(q: onnx.NodeProto, graph: _Graph) -> int:
    """What a QuantizeLinear writes: its zero point's type, ``output_dtype``, else uint8 (ONNX)."""
    if len(q.input) > 2 and q.input[2] and (zp := graph.elem_type(q.input[2])):
        return zp
    dtype = _get_attr(q, "output_dtype")
    return int(dtype) if dtype else TensorProto.UINT8


def _storage_type(dq: onnx.NodeProto, graph: _Graph) -> int:
    """Element type of the values a DequantizeLinear reads, from the cheapest source that says."""
    zp = dq.input[2] if len(dq.input) > 2 else ""
    for name in (zp, dq.input[0]):
        if name in graph.constants:
            return graph.constants[name].data_type
    q = graph.producer.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear":
        return _quantize_output_type(q, graph)
    return (zp and graph.elem_type(zp)) or graph.elem_type(dq.input[0]) or TensorProto.UINT8


def _grid(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _fit_bits(lo: int, hi: int, signed: bool, storage_bits: int) -> int:
    """The smallest width (at least MIN_BITS) whose integer grid holds ``[lo, hi]``."""
    for bits in range(MIN_BITS, storage_bits):
        qmin, qmax = _grid(bits, signed)
        if qmin <= lo and hi <= qmax:
            return bits
    return max(storage_bits, MIN_BITS)


def _clip_bounds(clip: onnx.NodeProto, graph: _Graph) -> tuple[float | None, float | None] | None:
    """A Clip's constant (min, max), None for a bound it lacks; None when a bound is computed."""
    bounds: list[float | None] = []
    for index, attr in ((1, "min"), (2, "max")):  # inputs since opset 11, attributes before
        name = clip.input[index] if len(clip.input) > index else ""
        if name:
            values = graph.array(name)
            if values is None or values.size != 1:
                return None
            bounds.append(float(values.reshape(-1)[0]))
        else:
            value = _get_attr(clip, attr)
            bounds.append(None if value is None else float(value))  # type: ignore[arg-type]
    return bounds[0], bounds[1]


def _is_narrowing_clip(node: onnx.NodeProto, graph: _Graph) -> bool:
    """A Clip with constant bounds that feeds only QuantizeLinear: it narrows an activation to
    a sub-storage bit width, which an integer compiler folds into the quantization."""
    if node.op_type != "Clip" or not node.output or node.output[0] in graph.outputs:
        return False
    readers = graph.consumers.get(node.output[0], [])
    return (
        bool(readers)
        and all(r.op_type == "QuantizeLinear" for r in readers)
        and _clip_bounds(node, graph) is not None
    )


def _is_annotation(node: onnx.NodeProto, graph: _Graph) -> bool:
    """Quantization annotations, which every target accepts whatever its operator list."""
    return node.op_type in _QDQ_OPS or _is_narrowing_clip(node, graph)


def _weight_bits(values: np.ndarray | None, stype: int, storage_bits: int) -> int:
    if values is None or values.size == 0 or stype not in _INT_BITS:
        return storage_bits
    values = values.astype(np.int64)
    return _fit_bits(int(values.min()), int(values.max()), stype not in _UNSIGNED, storage_bits)


def _activation_bits(
    clip: onnx.NodeProto, q: onnx.NodeProto, stype: int, storage_bits: int, graph: _Graph
) -> int:
    """The integer range a Clip leaves: its bounds over the scale, plus the zero point."""
    bounds = _clip_bounds(clip, graph)
    scale = graph.array(q.input[1])
    zp = graph.array(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros(())
    if bounds is None or scale is None or zp is None or stype not in _INT_BITS:
        return storage_bits
    signed = stype not in _UNSIGNED
    qmin, qmax = _grid(storage_bits, signed)
    scale, zp = scale.astype(np.float64), zp.astype(np.int64)
    lo_f, hi_f = bounds
    lo = qmin if lo_f is None else int(np.min(np.round(lo_f / scale) + zp))
    hi = qmax if hi_f is None else int(np.max(np.round(hi_f / scale) + zp))
    return _fit_bits(max(lo, qmin), min(hi, qmax), signed, storage_bits)


def _size(name: str, graph: _Graph) -> int | None:
    shape = tuple(graph.constants[name].dims) if name in graph.constants else graph.shape(name)
    if shape is None or None in shape:
        return None
    return int(np.prod(shape, dtype=np.int64))


def _describe(dq: onnx.NodeProto, graph: _Graph) -> QuantizedTensor:
    """One DequantizeLinear's tensor: where its integers come from and how wide they are."""
    stype = _storage_type(dq, graph)
    storage_bits = _INT_BITS.get(stype) or _FLOAT_BITS.get(stype, 8)
    source = dq.input[0]
    q = graph.producer.get(source)
    q = q if q is not None and q.op_type == "QuantizeLinear" else None
    bits = storage_bits
    if source in graph.constants:  # integers stored in the model
        kind, name = "weight", source
        bits = _weight_bits(graph.array(source), stype, storage_bits)
    elif q is not None and q.input[0] in graph.constants:  # a float constant quantized in-graph
        kind, name = "weight", q.input[0]
    elif q is not None:
        kind, name = "activation", q.input[0]
        clip = graph.producer.get(q.input[0])
        if clip is not None and _is_narrowing_clip(clip, graph):
            name = clip.input[0]
            bits = _activation_bits(clip, q, stype, storage_bits, graph)
    else:  # integers from a graph input or an op that computes them
        kind, name = "activation", source
    scales = _size(dq.input[1], graph) if len(dq.input) > 1 else None
    readers = graph.consumers.get(dq.output[0], []) if dq.output else []
    return QuantizedTensor(
        name=name,
        kind=kind,
        bits=bits,
        storage=TensorProto.DataType.Name(stype).lower(),
        signed=stype not in _UNSIGNED,
        per_channel=scales is not None and scales > 1,
        consumer=", ".join(dict.fromkeys(r.op_type for r in readers)),
    )


def quantized_tensors(model: onnx.ModelProto) -> list[QuantizedTensor]:
    """Every tensor of a QDQ graph that a ``DequantizeLinear`` restores, in graph order.

    Read from the graph, so models quantized by other tools, e.g.
    ``onnxruntime.quantization.quantize_static``, are described too; bit widths archnet's
    exporter declared in the model's metadata take precedence over the stored range. A
    ``QuantizeLinear`` that feeds several ``DequantizeLinear`` nodes gives one entry each.
    """
    graph = _Graph(model)
    found = [_describe(n, graph) for n in model.graph.node if n.op_type == "DequantizeLinear"]
    declared = _declared_bits(model)
    return [dataclasses.replace(t, bits=declared.get(t.name, t.bits)) for t in found]


def _declared_bits(model: onnx.ModelProto) -> dict[str, int]:
    """Bit widths archnet's exporter recorded, by graph tensor.

    A trained weight rarely fills its grid (4-bit weights often span only [-5, 6]), so the
    stored values understate the width; where the exporter declared it, that is the truth.
    """
    from archnet.quant.export import REPORT_KEY

    for prop in model.metadata_props:
        if prop.key == REPORT_KEY:
            return {e["tensor"]: e["bits"] for e in json.loads(prop.value) if "tensor" in e}
    return {}


def _is_dequantized(name: str, graph: _Graph) -> bool:
    """Whether ``name`` is (an alias of) a DequantizeLinear output over integers."""
    node = graph.producer.get(graph.resolve(name))
    return (
        node is not None
        and node.op_type == "DequantizeLinear"
        and _storage_type(node, graph) in _INT_BITS
    )


def _float_inputs(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    """The data and weight inputs of a compute node that are not dequantized integers (a float
    bias is fine: integer kernels add it in the accumulator's scale)."""
    return [name for name in node.input[:2] if name and not _is_dequantized(name, graph)]


def float_compute_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Compute nodes (``COMPUTE_OPS``) with a data or weight input that is not dequantized
    from integers: the arithmetic an integer-only chip cannot run. Nodes a compiler removes
    (constant subgraphs) are left out."""
    graph = _Graph(model)
    removed = _removed_nodes(model)
    return [
        node
        for i, node in enumerate(model.graph.node)
        if i not in removed and node.op_type in COMPUTE_OPS and _float_inputs(node, graph)
    ]


# --- rules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Finding:
    rule: str  # key in the [rules] table
    attribute: str  # the offending value, e.g. "kernel_shape=[7, 7]"
    message: str | None = None  # what is wrong, when "ATTRIBUTE is not allowed" does not say


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


def _quantized_only(node: _Node, rules: Rules) -> Iterator[_Finding]:
    """Integer-only chips have no float multipliers: both operands must be dequantized ints."""
    if not rules.quantized_only:
        return
    for name in _float_inputs(node.proto, node.graph):
        message = f"float compute: input '{name}' is not dequantized from an integer tensor"
        yield _Finding("quantized_only", f"input={name}", message)


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
        _quantized_only,
    ),
    "ConvTranspose": (_quantized_only,),
    "MaxPool": _POOL,
    "AveragePool": _POOL,
    "Gemm": (_max_channels(_gemm_features, ("in_features", "out_features")), _quantized_only),
    "MatMul": (_max_channels(_matmul_features, ("in_features", "out_features")), _quantized_only),
}


def _show(value: object) -> str:
    """A rule value as written in TOML."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return str([list(v) if isinstance(v, tuple) else v for v in value])
    return f'"{value}"' if isinstance(value, str) else str(value)


def _check_node(node: _Node, target: Target) -> Iterator[Violation]:
    proto = node.proto
    if not target.allows(proto.op_type) and not _is_annotation(proto, node.graph):
        reason = f"operator {proto.op_type} is not allowed by {target.name}"
        yield Violation(proto.name, proto.op_type, reason, module=module_of(proto))
        return
    if not target.rules:
        return
    for check in _CHECKS.get(proto.op_type, ()):
        for f in check(node, target.rules):
            allowed = _show(getattr(target.rules, f.rule))
            message = f.message or f"{f.attribute} is not allowed"
            reason = f"{message} ({target.name} rules.{f.rule} = {allowed})"
            yield Violation(proto.name, proto.op_type, reason, f.attribute, module_of(proto))


def check_model(model: onnx.ModelProto, target: Target) -> list[Violation]:
    """Every broken operator or attribute rule, in graph order (a node may break several).

    Nodes a compiler removes (``Identity``, constant subgraphs) are not checked, and
    quantization annotations (Q/DQ and the Clip that narrows an activation) are never
    forbidden ops.
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
    from archnet.quant.export import export_any

    violations = check_model(export_any(module, input_shape), target)
    if not violations:
        return None
    return "; ".join(sorted({v.reason for v in violations}))
