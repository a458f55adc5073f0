"""Quantized tensors read from QDQ graphs: the width the graph proves (stored integers, the
range a QuantizeLinear can emit), the width the model declares, and whether they agree."""

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from archnet.errors import ArchnetError
from archnet.quant import export_qdq, qdq_report, quant_range
from archnet.quant.export import REPORT_KEY
from archnet.targets.qdq import (
    COMPUTE_OPS,
    MISMATCH,
    UNVERIFIED,
    VERIFIED,
    QuantizedTensor,
    float_compute_nodes,
    quantized_tensors,
)
from tests.targets.graphs import (
    SCALE,
    GraphBuilder,
    activation_graph,
    compliant,
    declare,
    int_weight,
    prepared_conv_net,
    qdq_compliant,
    quantize_input,
    saturate_weights,
    tiny_quantized_classifier,
)


def weight_of(model: onnx.ModelProto) -> QuantizedTensor:
    return next(t for t in quantized_tensors(model) if t.kind == "weight")


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_bits_from_stored_range(bits: int, signed: bool) -> None:
    """int8 (uint8) storage whose values stay in a b-bit grid is a b-bit weight."""
    g = GraphBuilder()
    x = quantize_input(g, "in")
    lo, hi = quant_range(bits, signed)
    w = int_weight(g, "w", (8, 8, 3, 3), lo, hi, signed)
    g.add("Conv", "/c/Conv", [x, w], kernel_shape=[3, 3])
    name = "int8" if signed else "uint8"
    assert weight_of(g.model()) == QuantizedTensor(
        "w_quantized", "weight", bits, name, signed, True, "Conv", None, (lo, hi)
    )


@pytest.mark.parametrize(("below", "above"), [(0, 1), (1, 0)])
def test_weight_bits_one_past_the_grid(below: int, above: int) -> None:
    """One value past a b-bit grid needs b + 1 bits; the grid is the storage type's (signed
    here), so non-negative values in int8 storage need a sign bit more than in uint8."""
    bits = 4
    qmin, qmax = quant_range(bits, signed=True)
    g = GraphBuilder()
    x = quantize_input(g, "in")
    g.add("MatMul", "/m/MatMul", [x, int_weight(g, "w", (16, 4), qmin - below, qmax + above)])
    weight = weight_of(g.model())
    assert (weight.bits, weight.consumer) == (bits + 1, "MatMul")
    u = GraphBuilder()
    _, umax = quant_range(bits, signed=False)
    u.add("MatMul", "/m/MatMul", [quantize_input(u, "in"), int_weight(u, "w", (16, 4), 0, umax)])
    weight = weight_of(u.model())
    assert (weight.storage, weight.bits, weight.span) == ("int8", bits + 1, (0, umax))


@pytest.mark.parametrize(("bits", "signed"), [(2, False), (4, False), (3, True), (8, False)])
def test_activation_bits_from_clip(bits: int, signed: bool) -> None:
    g = GraphBuilder()
    x = quantize_input(g, "act", bits, signed)
    g.add("Relu", "/r/Relu", [x])
    model = g.model()
    assert ("Clip" in {n.op_type for n in model.graph.node}) == (bits < 8)
    (act,) = quantized_tensors(model)
    storage = "int8" if signed else "uint8"
    span = quant_range(bits, signed)
    assert act == QuantizedTensor(
        "x", "activation", bits, storage, signed, False, "Relu", None, span
    )


def test_clip_bounds_map_through_scale_and_zero_point() -> None:
    """A Clip to [0, 0.75] before a uint8 QuantizeLinear with scale 0.05 and zero point 100
    leaves round(0.75 / 0.05) + 100 = 115 as the top and 100 as the bottom: 7 bits."""
    g = GraphBuilder()
    g.const("lo", np.float32(0.0))
    g.const("hi", np.float32(0.75))
    g.const("s", np.float32(SCALE))
    g.const("zp", np.uint8(100))
    g.add("Clip", "/a/Clip", ["x", "lo", "hi"])
    q = g.add("QuantizeLinear", "/a/Q", [g.last, "s", "zp"])
    g.add("DequantizeLinear", "/a/DQ", [q, "s", "zp"])
    (act,) = quantized_tensors(g.model())
    assert (act.name, act.span, act.bits) == ("x", (100, 115), 7)


def test_float_constant_quantized_in_graph() -> None:
    """A float weight behind QuantizeLinear: its integers are computed as the Q would, per
    channel along ``axis``."""
    g = GraphBuilder(channels=2, size=1)
    g.add("Flatten", "/Flatten", axis=1)
    values = np.array([[-1.0, 1.75], [-2.0, 0.5]], np.float32)  # rows: channels
    g.const("wf", values)
    g.const("ws", np.array([0.25, 0.5], np.float32))
    g.const("wz", np.zeros(2, np.int8))
    g.nodes.append(helper.make_node("QuantizeLinear", ["wf", "ws", "wz"], ["wq"], axis=0))
    g.nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0))
    g.add("MatMul", "/m/MatMul", [quantize_input(g, "in"), "wd"])
    weight = weight_of(g.model())
    assert (weight.name, weight.span, weight.bits, weight.per_channel) == ("wf", (-4, 7), 4, True)


def test_quantized_tensors_of_float_graph_is_empty() -> None:
    assert quantized_tensors(compliant().model()) == []
    assert {n.name for n in float_compute_nodes(compliant().model())} == {
        n.name for n in compliant().model().graph.node if n.op_type in COMPUTE_OPS
    }
    assert float_compute_nodes(qdq_compliant().model()) == []


def test_float8_weight_has_no_integer_grid() -> None:
    f = GraphBuilder()
    f.const("s", np.float32(1.0))
    f.const("w8", np.zeros((8, 8, 3, 3), np.float32))
    f.inits.append(helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    f.nodes.append(helper.make_node("QuantizeLinear", ["w8", "s", "zp"], ["wq"], name="wq"))
    f.nodes.append(helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], name="wd"))
    f.add("Conv", "/f/Conv", [quantize_input(f, "in"), "wd"], kernel_shape=[3, 3])
    model = f.raw(opset=19)
    weight = weight_of(model)
    assert (weight.name, weight.storage, weight.bits, weight.span) == (
        "w8",
        "float8e4m3fn",
        8,
        None,
    )
    assert [n.name for n in float_compute_nodes(model)] == ["/f/Conv"]  # float8 is not integer


# --- declared widths ------------------------------------------------------------------------------


def test_genuine_4bit_export_verifies_every_declaration() -> None:
    """prepare_qat + export_qdq at w4a4: each tensor is declared 4-bit and the graph proves
    it, weights from their stored integers, activations from the Clip before their Q."""
    proto = export_qdq(prepared_conv_net("w4a4"), (1, 3, 16, 16))
    tensors = quantized_tensors(proto)
    # three weights; the input; each conv's output after its ReLU; the pool's output, and its
    # grid again after the flatten (each tensor quantized once, where it is produced)
    assert len(tensors) == 8
    assert {t.declared_bits for t in tensors} == {4}
    assert all(t.declaration == VERIFIED for t in tensors), tensors
    assert all(t.bits <= 4 for t in tensors)
    assert {t.bits for t in tensors if t.kind == "activation"} == {4}


def test_real_qdq_export_bits_match_the_export_report() -> None:
    """Saturated weights reach the edge of their grid: then the graph proves exactly the
    width the exporter declares, for every tensor and in the same order."""
    model = tiny_quantized_classifier()
    saturate_weights(model)
    proto = export_qdq(model, (1, 3, 16, 16))
    report, found = qdq_report(proto), quantized_tensors(proto)
    assert len(found) == len(report)
    for t, r in zip(found, report, strict=True):  # one DequantizeLinear per quantizer, in order
        assert (t.name, t.kind, t.bits, t.declared_bits, t.signed, t.per_channel, t.storage) == (
            r["tensor"],
            r["kind"],
            r["bits"],
            r["bits"],
            r["signed"],
            r["per_channel"],
            r["storage"],
        ), (t, r)
    assert {t.bits for t in found} == {4, 8}
    assert {t.consumer for t in found} == {"Conv", "Gemm"}


def test_rewritten_declaration_does_not_change_the_graph_width() -> None:
    """Declaring 2 bits on a 4-bit weight leaves the proven width at 4: a mismatch."""
    model = tiny_quantized_classifier()
    saturate_weights(model)
    proto = export_qdq(model, (1, 3, 16, 16))
    report = qdq_report(proto)
    index = next(i for i, r in enumerate(report) if r["kind"] == "weight" and r["bits"] == 4)
    report[index]["bits"] = 2
    tensor = quantized_tensors(declare(proto, report))[index]
    assert (tensor.name, tensor.declared_bits, tensor.bits) == (report[index]["tensor"], 2, 4)
    assert tensor.declaration == MISMATCH


@pytest.mark.parametrize(
    ("clip", "bits", "status"),
    [("constant", 4, VERIFIED), (None, 8, MISMATCH), ("computed", 8, UNVERIFIED)],
)
def test_declared_4bit_activation(clip: str | None, bits: int, status: str) -> None:
    """Without a Clip an int8 Q can emit [-128, 127], outside the 4-bit grid; with a computed
    Clip bound the graph can prove neither."""
    model = declare(activation_graph(clip).model(), [{"tensor": "x", "bits": 4}])
    (act,) = quantized_tensors(model)
    assert (act.name, act.declared_bits, act.bits, act.declaration) == ("x", 4, bits, status)
    assert (act.unread is not None) == (status == UNVERIFIED)
    if status == UNVERIFIED:
        assert "Clip '/a/Clip'" in act.unread and "computed" in act.unread


def test_computed_scale_leaves_a_declaration_unverified() -> None:
    """Dynamic quantization: the scale is computed from the tensor at run time, so the Clip's
    bounds cannot be mapped to integers; the storage type still proves 8 bits."""
    g = GraphBuilder()
    g.const("zp", np.int8(0))
    g.const("lo", np.float32(-8 * SCALE))
    g.const("hi", np.float32(7 * SCALE))
    scale = g.add("ReduceMax", "/s/ReduceMax", ["x"], keepdims=0)
    clipped = g.add("Clip", "/a/Clip", ["x", "lo", "hi"])
    q = g.add("QuantizeLinear", "/a/Q", [clipped, scale, "zp"])
    g.add("DequantizeLinear", "/a/DQ", [q, scale, "zp"])
    model = declare(g.model(), [{"tensor": "x", "bits": 4}])
    (act,) = quantized_tensors(model)
    assert act.declaration == UNVERIFIED and "scale '/s/ReduceMax_out'" in (act.unread or "")
    assert dataclasses.replace(act, declared_bits=8).declaration == VERIFIED


def test_declarations_pair_with_tensors_in_order() -> None:
    """Two quantizers of one tensor: a 4-bit one (Clip) and an 8-bit one, declared in order."""
    g = GraphBuilder()
    quantize_input(g, "a", bits=4)
    g.last = "x"
    quantize_input(g, "b", bits=8)
    g.add("Concat", "/Concat", ["a_dq_out", "b_dq_out"], axis=1)
    model = g.model()
    ok = quantized_tensors(declare(model, [{"tensor": "x", "bits": 4}, {"tensor": "x", "bits": 8}]))
    assert [(t.name, t.declared_bits, t.declaration) for t in ok] == [
        ("x", 4, VERIFIED),
        ("x", 8, VERIFIED),
    ]
    swapped = quantized_tensors(
        declare(model, [{"tensor": "x", "bits": 8}, {"tensor": "x", "bits": 4}])
    )
    assert [t.declaration for t in swapped] == [VERIFIED, MISMATCH]


def test_model_without_declarations() -> None:
    tensors = quantized_tensors(qdq_compliant().model())
    assert tensors and all(t.declared_bits is None and t.declaration is None for t in tensors)


def test_unreadable_declarations_are_an_error() -> None:
    model = qdq_compliant().model()
    helper.set_model_props(model, {REPORT_KEY: '{"tensor": "x"'})
    with pytest.raises(ArchnetError, match=REPORT_KEY):
        quantized_tensors(model)
