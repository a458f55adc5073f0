"""Quantized (QDQ) graphs as an integer compiler reads them: which tensors are integers, how
wide their integers can be, and which compute nodes still do float arithmetic.

Widths are proven from the graph alone, so models from other quantizers (onnxruntime's
``quantize_static``) are understood too: a weight's width is that of the narrowest grid
holding its stored integers; an activation's is the integer range its ``QuantizeLinear`` can
emit, the storage type's range narrowed by a constant ``Clip`` in front of it. Bit widths a
model declares (archnet's exporter writes them to its metadata) are kept beside the proven
ones and never replace them: a declaration is verified when the graph's integers fit inside
the declared grid.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from archnet.errors import ArchnetError
from archnet.quant.export import REPORT_KEY
from archnet.targets.graph import Graph, get_attr

__all__ = [
    "COMPUTE_OPS",
    "MIN_BITS",
    "MISMATCH",
    "UNVERIFIED",
    "VERIFIED",
    "QuantizedGraph",
    "QuantizedTensor",
    "declared_bits",
    "float_compute_nodes",
    "float_inputs",
    "is_annotation",
    "quantized_tensors",
    "read_quantized",
]

# Nodes that do the arithmetic an integer NPU runs in integers (quantized_only checks them).
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
MIN_BITS = 2  # the narrowest width reported: a 1-bit signed grid holds only -1 and 0

# What a declaration is, once checked against the graph.
VERIFIED = "verified"  # the graph's integers fit the declared grid
MISMATCH = "mismatch"  # they do not: the graph lets the tensor hold values outside it
UNVERIFIED = "unverified"  # a value the proof needs (a Clip bound, a scale) is computed


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


def _grid(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _fits(span: tuple[int, int], bits: int, signed: bool) -> bool:
    qmin, qmax = _grid(bits, signed)
    return qmin <= span[0] and span[1] <= qmax


def _fit_bits(span: tuple[int, int], signed: bool, storage_bits: int) -> int:
    """The smallest width (at least MIN_BITS) whose integer grid holds ``span``."""
    for bits in range(MIN_BITS, storage_bits):
        if _fits(span, bits, signed):
            return bits
    return max(storage_bits, MIN_BITS)


@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor a ``DequantizeLinear`` restores, as an integer compiler would see it.

    ``bits`` can be narrower than the storage type: sub-8-bit tensors are usually kept in int8
    or uint8 (int4 kernels are rare), so the width is what the graph restricts: a weight's
    stored integers, or the ``Clip`` in front of an activation's ``QuantizeLinear``.
    """

    name: str  # a weight's integer initializer, or the float tensor an activation quantizes
    kind: str  # "weight" (constant) or "activation" (quantized at run time)
    bits: int  # the width the graph proves: the narrowest grid holding ``span`` (at least 2)
    storage: str  # the stored element type: "int8", "uint8", "int4", "int32", ...
    signed: bool
    per_channel: bool  # one scale per channel (or block) rather than one for the tensor
    consumer: str  # op types that read the dequantized tensor, e.g. "Conv"; "" when none
    declared_bits: int | None = None  # what the model's metadata says; None when it is silent
    span: tuple[int, int] | None = None  # lowest and highest integer; None for float storage
    unread: str | None = None  # why the graph proves only the storage range, when it does

    @property
    def declaration(self) -> str | None:
        """VERIFIED, MISMATCH or UNVERIFIED for a declared width; None when none is declared."""
        if self.declared_bits is None:
            return None
        if self.span is None:  # float storage has no integer grid to fit
            return VERIFIED if self.declared_bits >= self.bits else UNVERIFIED
        if _fits(self.span, self.declared_bits, self.signed):
            return VERIFIED
        return UNVERIFIED if self.unread else MISMATCH


# --- storage and ranges ---------------------------------------------------------------------------


def _quantize_output_type(q: onnx.NodeProto, graph: Graph) -> int:
    """What a QuantizeLinear writes: its zero point's type, ``output_dtype``, else uint8 (ONNX)."""
    if len(q.input) > 2 and q.input[2] and (zp := graph.elem_type(q.input[2])):
        return zp
    dtype = get_attr(q, "output_dtype")
    return int(dtype) if dtype else TensorProto.UINT8


def _storage_type(dq: onnx.NodeProto, graph: Graph) -> int:
    """Element type of the values a DequantizeLinear reads, from the cheapest source that says."""
    zp = dq.input[2] if len(dq.input) > 2 else ""
    for name in (zp, dq.input[0]):
        if name in graph.constants:
            return graph.constants[name].data_type
    q = graph.producer.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear":
        return _quantize_output_type(q, graph)
    return (zp and graph.elem_type(zp)) or graph.elem_type(dq.input[0]) or TensorProto.UINT8


def _clip_bounds(clip: onnx.NodeProto, graph: Graph) -> tuple[float | None, float | None] | None:
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
            value = get_attr(clip, attr)
            bounds.append(None if value is None else float(value))
    return bounds[0], bounds[1]


def _feeds_only_quantize(node: onnx.NodeProto, graph: Graph) -> bool:
    """Whether only QuantizeLinear nodes read ``node``'s output (and it is no graph output)."""
    if not node.output or node.output[0] in graph.outputs:
        return False
    readers = graph.consumers.get(node.output[0], [])
    return bool(readers) and all(r.op_type == "QuantizeLinear" for r in readers)


def _clip_before(q: onnx.NodeProto, graph: Graph) -> onnx.NodeProto | None:
    """The Clip that writes ``q``'s input, if one does: it bounds what ``q`` can emit."""
    clip = graph.producer.get(q.input[0])
    return clip if clip is not None and clip.op_type == "Clip" else None


def _is_narrowing_clip(node: onnx.NodeProto, graph: Graph) -> bool:
    """A Clip with constant bounds that feeds only QuantizeLinear: it narrows an activation to
    a sub-storage bit width, which an integer compiler folds into the quantization."""
    return (
        node.op_type == "Clip"
        and _feeds_only_quantize(node, graph)
        and _clip_bounds(node, graph) is not None
    )


def is_annotation(node: onnx.NodeProto, graph: Graph) -> bool:
    """Quantization annotations (Q/DQ and the narrowing Clip), which every target accepts
    whatever its operator list."""
    return node.op_type in _QDQ_OPS or _is_narrowing_clip(node, graph)


def _computed(what: str, name: str, node: onnx.NodeProto) -> str:
    return f"the {what} '{name}' of {node.op_type} '{node.name or node.output[0]}' is computed"


def _scale_and_zero(q: onnx.NodeProto, graph: Graph) -> tuple[np.ndarray, np.ndarray] | str:
    """A QuantizeLinear's constant scale and zero point, or why they cannot be read."""
    scale = graph.array(q.input[1])
    if scale is None:
        return _computed("scale", q.input[1], q)
    has_zp = len(q.input) > 2 and q.input[2]
    zp = graph.array(q.input[2]) if has_zp else np.zeros((), np.int64)
    if zp is None:
        return _computed("zero point", q.input[2], q)
    return scale.astype(np.float32), zp.astype(np.int64)


def _activation_span(
    q: onnx.NodeProto, clip: onnx.NodeProto | None, storage: tuple[int, int], graph: Graph
) -> tuple[tuple[int, int], str | None]:
    """The integers ``q`` can emit: the storage range, narrowed by the Clip's bounds mapped
    through scale and zero point as QuantizeLinear maps values (round half to even)."""
    if clip is None:
        return storage, None
    bounds = _clip_bounds(clip, graph)
    if bounds is None:
        return storage, f"the bounds of Clip '{clip.name or clip.output[0]}' are computed"
    read = _scale_and_zero(q, graph)
    if isinstance(read, str):
        return storage, read
    scale, zp = read
    lo_f, hi_f = bounds
    lo = storage[0] if lo_f is None else int(np.min(np.round(np.float32(lo_f) / scale) + zp))
    hi = storage[1] if hi_f is None else int(np.max(np.round(np.float32(hi_f) / scale) + zp))
    return (max(lo, storage[0]), min(hi, storage[1])), None


def _constant_span(
    q: onnx.NodeProto, storage: tuple[int, int], graph: Graph
) -> tuple[tuple[int, int], str | None]:
    """The integers ``q`` makes of a float constant, computed as QuantizeLinear would."""
    values = graph.array(q.input[0])
    read = _scale_and_zero(q, graph)
    if isinstance(read, str) or values is None or values.size == 0:
        return storage, read if isinstance(read, str) else None
    scale, zp = read
    if scale.ndim > 1:
        return storage, f"QuantizeLinear '{q.name or q.output[0]}' has blocked scales"
    if scale.size > 1:  # per channel along ``axis`` (default 1)
        axis = get_attr(q, "axis")
        axis = (1 if axis is None else int(axis)) % values.ndim
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    ints = np.clip(np.round(values.astype(np.float32) / scale) + zp, *storage)
    return (int(ints.min()), int(ints.max())), None


def _stored_span(values: np.ndarray | None, storage: tuple[int, int]) -> tuple[int, int]:
    if values is None or values.size == 0:
        return storage
    values = values.astype(np.int64)
    return int(values.min()), int(values.max())


def _size(name: str, graph: Graph) -> int | None:
    shape = tuple(graph.constants[name].dims) if name in graph.constants else graph.shape(name)
    if shape is None or None in shape:
        return None
    return int(np.prod(shape, dtype=np.int64))


def _describe(dq: onnx.NodeProto, graph: Graph) -> QuantizedTensor:
    """One DequantizeLinear's tensor: where its integers come from and how wide they can be."""
    stype = _storage_type(dq, graph)
    integer = stype in _INT_BITS
    storage_bits = _INT_BITS.get(stype) or _FLOAT_BITS.get(stype, 8)
    signed = stype not in _UNSIGNED
    storage = _grid(storage_bits, signed)
    source = dq.input[0]
    q = graph.producer.get(source)
    q = q if q is not None and q.op_type == "QuantizeLinear" else None
    unread = None
    if source in graph.constants:  # integers stored in the model
        kind, name = "weight", source
        span = _stored_span(graph.array(source), storage) if integer else storage
    elif q is not None and q.input[0] in graph.constants:  # a float constant quantized in-graph
        kind, name = "weight", q.input[0]
        span, unread = _constant_span(q, storage, graph) if integer else (storage, None)
    elif q is not None:
        clip = _clip_before(q, graph)
        # a Clip only quantization reads is part of it: name the tensor it narrows
        named = clip is not None and _feeds_only_quantize(clip, graph)
        kind, name = "activation", clip.input[0] if named else q.input[0]
        span, unread = _activation_span(q, clip, storage, graph) if integer else (storage, None)
    else:  # integers from a graph input or an op that computes them: only the storage says
        kind, name, span = "activation", source, storage
    scales = _size(dq.input[1], graph) if len(dq.input) > 1 else None
    readers = graph.consumers.get(dq.output[0], []) if dq.output else []
    return QuantizedTensor(
        name=name,
        kind=kind,
        bits=_fit_bits(span, signed, storage_bits) if integer else storage_bits,
        storage=TensorProto.DataType.Name(stype).lower(),
        signed=signed,
        per_channel=scales is not None and scales > 1,
        consumer=", ".join(dict.fromkeys(r.op_type for r in readers)),
        span=span if integer else None,
        unread=unread if integer else f"{TensorProto.DataType.Name(stype).lower()} is not integer",
    )


# --- declarations ---------------------------------------------------------------------------------


def declared_bits(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """The (tensor, bits) pairs a model declares in its metadata (archnet's exporter writes
    them under ``REPORT_KEY``), in the order written; empty when it declares nothing."""
    for prop in model.metadata_props:
        if prop.key != REPORT_KEY:
            continue
        try:
            entries = json.loads(prop.value)
            return [(str(e["tensor"]), int(e["bits"])) for e in entries if "tensor" in e]
        except (ValueError, TypeError, KeyError):
            raise ArchnetError(
                f"the model's metadata '{REPORT_KEY}' is not a list of {{tensor, bits}} "
                "entries; re-export the model or remove that metadata entry"
            ) from None
    return []


@dataclass(frozen=True)
class QuantizedGraph:
    """Every quantized tensor with the DequantizeLinear that restores it, and the declared
    widths that name no tensor of the graph."""

    tensors: tuple[QuantizedTensor, ...]
    dequantizers: tuple[onnx.NodeProto, ...]  # one per tensor, same order
    stray: tuple[tuple[str, int], ...]  # (tensor, bits) declared for no quantized tensor


def read_quantized(graph: Graph) -> QuantizedGraph:
    """Describe every ``DequantizeLinear``, then pair declarations with tensors by name, in
    order (two quantizers of one tensor give two entries of that name)."""
    dequantizers = tuple(n for n in graph.model.graph.node if n.op_type == "DequantizeLinear")
    pending: dict[str, list[int]] = {}
    for name, bits in declared_bits(graph.model):
        pending.setdefault(name, []).append(bits)
    tensors = []
    for dq in dequantizers:
        t = _describe(dq, graph)
        widths = pending.get(t.name)
        if widths:
            t = dataclasses.replace(t, declared_bits=widths.pop(0))
        tensors.append(t)
    stray = tuple((name, bits) for name, widths in pending.items() for bits in widths)
    return QuantizedGraph(tuple(tensors), dequantizers, stray)


def quantized_tensors(model: onnx.ModelProto) -> list[QuantizedTensor]:
    """Every tensor of a QDQ graph that a ``DequantizeLinear`` restores, in graph order, with
    the width the graph proves and the width the model declares (None when it declares none).
    A ``QuantizeLinear`` that feeds several ``DequantizeLinear`` nodes gives one entry each.
    """
    return list(read_quantized(Graph(model)).tensors)


# --- float compute --------------------------------------------------------------------------------


def _is_dequantized(name: str, graph: Graph) -> bool:
    """Whether ``name`` is (an alias of) a DequantizeLinear output over integers."""
    node = graph.producer.get(graph.resolve(name))
    return (
        node is not None
        and node.op_type == "DequantizeLinear"
        and _storage_type(node, graph) in _INT_BITS
    )


def float_inputs(node: onnx.NodeProto, graph: Graph) -> list[str]:
    """The data and weight inputs of a compute node that are not dequantized integers (a float
    bias is fine: integer kernels add it in the accumulator's scale)."""
    return [name for name in node.input[:2] if name and not _is_dequantized(name, graph)]


def float_compute_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Compute nodes (``COMPUTE_OPS``) with a data or weight input that is not dequantized
    from integers: the arithmetic an integer-only chip cannot run. Nodes a compiler removes
    (constant subgraphs) are left out."""
    graph = Graph(model)
    return [n for n in graph.kept_nodes() if n.op_type in COMPUTE_OPS and float_inputs(n, graph)]
