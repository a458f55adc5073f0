"""onnx_bytes: the file and initializer bytes of an ONNX model, 4-bit types packed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from archnet.errors import ArchnetError
from archnet.quant import OnnxSize, onnx_bytes

# float32 3x4 (48 bytes), int8 x5 (5), int4 x7 packed (4), int64 scalar (8),
# float32 x2 in the typed float_data field (8)
INIT_BYTES = 48 + 5 + 4 + 8 + 8


def _model() -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.ones((3, 4), np.float32), "f"),
        numpy_helper.from_array(np.arange(5, dtype=np.int8), "i8"),
        helper.make_tensor("i4", TensorProto.INT4, [7], bytes([0x21, 0x43, 0x65, 0x07]), raw=True),
        numpy_helper.from_array(np.array(3, np.int64), "i64"),
        helper.make_tensor("typed", TensorProto.FLOAT, [2], [1.0, 2.0]),
    ]
    nodes = [helper.make_node("Identity", [t.name], [f"{t.name}_out"]) for t in inits]
    outputs = [helper.make_empty_tensor_value_info(f"{t.name}_out") for t in inits]
    graph = helper.make_graph(nodes, "sizes", [], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_initializer_bytes_of_a_model_built_by_hand() -> None:
    size = onnx_bytes(_model())
    assert isinstance(size, OnnxSize)
    assert size.initializer_bytes == INIT_BYTES


def test_file_bytes_are_what_onnx_writes(tmp_path) -> None:
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    on_disk = path.stat().st_size
    assert onnx_bytes(model) == OnnxSize(on_disk, INIT_BYTES)
    assert onnx_bytes(path) == OnnxSize(on_disk, INIT_BYTES)
    assert onnx_bytes(str(path)).file_bytes == on_disk
    assert on_disk > INIT_BYTES  # the graph and names cost bytes too


def test_external_data_counts_in_the_file_size(tmp_path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        _model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.data",
        size_threshold=0,
    )
    total = path.stat().st_size + (tmp_path / "ext.data").stat().st_size
    size = onnx_bytes(path)
    assert size == OnnxSize(total, INIT_BYTES)
    with pytest.raises(ArchnetError, match="external"):
        onnx_bytes(onnx.load(str(path), load_external_data=False))


def test_bad_input_is_refused(tmp_path) -> None:
    with pytest.raises(ArchnetError, match="not found"):
        onnx_bytes(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xff\xff not a protobuf")
    with pytest.raises(ArchnetError, match="not an ONNX model"):
        onnx_bytes(junk)
    with pytest.raises(ArchnetError, match="ModelProto or a path"):
        onnx_bytes(42)
