"""The int4 probe: it reads onnxruntime's answers right, and its own answers are right."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from archnet.errors import ArchnetError
from archnet.quant import int4_probe, int4_supported
from archnet.quant.int4 import LEVELS, Case, _probe_net, int4_patterns, run_case

X = np.array([-9.0, -1.0, 0.4, 3.0, 9.0], np.float32)


def _qdq_case(op: str = "QuantizeLinear", expected: list[float] | None = None) -> Case:
    """int8 Q -> DQ at step 0.5 of ``X``: by hand, [-9, -1, 0.4, 3, 9] -> [-9, -1, 0.5, 3, 9]."""
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    graph = helper.make_graph(
        [
            helper.make_node(op, ["x", "scale", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [scale, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    answer = [-9.0, -1.0, 0.5, 3.0, 9.0] if expected is None else expected
    return Case(model, {"x": X}, np.array(answer, np.float32), step=0.5)


def test_run_case_passes_a_graph_with_the_right_answer() -> None:
    result = run_case("qdq", _qdq_case())
    assert result.correct and result.error is None
    assert result.drift_steps == dict.fromkeys(LEVELS, 0.0)


def test_run_case_measures_drift_in_output_steps() -> None:
    result = run_case("qdq", _qdq_case(expected=[-9.0, -1.0, 0.5, 3.0, 10.0]))
    assert result.drift_steps == dict.fromkeys(LEVELS, 2.0)  # 1.0 off at step 0.5
    assert not result.correct


def test_run_case_reports_a_graph_that_does_not_load() -> None:
    result = run_case("bad", _qdq_case(op="NoSuchOp"))
    assert not result.correct
    assert set(result.drift_steps) == set(LEVELS)
    assert all(d is None for d in result.drift_steps.values())
    assert "NoSuchOp" in result.error


@pytest.mark.parametrize("act_bits", [3, 4])
def test_probe_answer_is_what_int8_storage_computes(act_bits: int) -> None:
    """The probe network in 8-bit containers, which onnxruntime has long run exactly, gives
    the answer the probe expects: the expected values are right, not just self-consistent."""
    case = _probe_net(weight_4bit=False, act_4bit=False, act_bits=act_bits)
    result = run_case("int8", case)
    assert result.drift_steps["as_written"] == 0.0
    # and the answer is not trivial: outputs differ across samples and classes
    assert len(np.unique(case.expected)) == case.expected.size


def test_probe_cases_store_what_they_claim() -> None:
    types = {t.name: t.data_type for t in _probe_net(True, True, 4).model.graph.initializer}
    assert types["w1_quantized"] == types["w2_quantized"] == TensorProto.INT4
    assert types["x_zero_point"] == TensorProto.INT4
    assert types["a_zero_point"] == TensorProto.UINT4
    # same numbers whatever the storage: only the storage is under test
    expected = {_probe_net(w, a, 4).expected.tobytes() for w in (0, 1) for a in (0, 1)}
    assert len(expected) == 1


def test_probe_covers_every_pattern_and_is_cached() -> None:
    results = int4_probe()
    assert list(results) == int4_patterns() == ["weight", "activation", "narrowed_activation"]
    assert int4_probe() is results
    for name, result in results.items():
        assert int4_supported(name) == result.correct
        assert set(result.drift_steps) == set(LEVELS)
    assert int4_supported() == all(r.correct for r in results.values())


def test_unknown_pattern_is_refused() -> None:
    with pytest.raises(ArchnetError, match="weight"):
        int4_supported("bias")
