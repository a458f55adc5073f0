"""What an ONNX model costs on disk, measured the same way for every model of a comparison.

``model_size_bits`` counts each weight at its bit width (the packed size a deployment could
reach); this counts the bytes onnx writes, so a 4-bit weight kept in an 8-bit container costs
a full byte here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from archnet.errors import ArchnetError

__all__ = ["OnnxSize", "onnx_bytes"]

# element types whose values onnx packs two per byte
_HALF_BYTE = {
    getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)
}


@dataclass(frozen=True)
class OnnxSize:
    """Bytes of the serialized model (file plus any external data), and of its initializers'
    data as stored (4-bit types two values per byte), graph structure and metadata excluded."""

    file_bytes: int
    initializer_bytes: int


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _graphs(sub)


def _external_length(tensor: onnx.TensorProto) -> int | None:
    entries = {e.key: e.value for e in tensor.external_data}
    return int(entries["length"]) if "length" in entries else None


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of one initializer's data at its element type's width."""
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    if tensor.data_location == TensorProto.EXTERNAL:
        length = _external_length(tensor)
        if length is not None:
            return length
    elif tensor.raw_data:
        return len(tensor.raw_data)
    numel = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    if tensor.data_type in _HALF_BYTE:
        return (numel + 1) // 2
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchnetError(
            f"initializer {tensor.name!r} has unknown type {tensor.data_type}"
        ) from exc
    return numel * itemsize


def _external_files(model: onnx.ModelProto) -> set[str]:
    return {
        e.value
        for g in _graphs(model.graph)
        for t in g.initializer
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ArchnetError(f"ONNX model file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise ArchnetError(f"{path} is not an ONNX model ({type(exc).__name__}: {exc})") from exc


def onnx_bytes(model: onnx.ModelProto | str | Path) -> OnnxSize:
    """The on-disk size of ``model`` (a path, or a model as ``onnx.save`` would write it)."""
    if isinstance(model, onnx.ModelProto):
        proto, file_bytes = model, model.ByteSize()
        if _external_files(proto):
            raise ArchnetError(
                "the model keeps data in external files; pass its path to measure them"
            )
    elif isinstance(model, (str, Path)):
        path = Path(model)
        proto = _load(path)
        file_bytes = path.stat().st_size
        for name in sorted(_external_files(proto)):
            data = path.parent / name
            if not data.is_file():
                raise ArchnetError(f"external data file of {path} not found: {data}")
            file_bytes += data.stat().st_size
    else:
        raise ArchnetError(
            f"onnx_bytes takes an onnx.ModelProto or a path, not {type(model).__name__}"
        )
    init = sum(_tensor_bytes(t) for g in _graphs(proto.graph) for t in g.initializer)
    return OnnxSize(file_bytes=file_bytes, initializer_bytes=init)
