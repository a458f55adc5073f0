"""QDQ export: onnxruntime reproduces the fake-quantized PyTorch model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from archnet.onnx_utils import ort_session
from archnet.quant import (
    QuantConfig,
    export_qdq,
    fold_bn,
    int4_supported,
    onnx_bytes,
    qdq_report,
    quantize_model,
)
from archnet.zoo import create_model


def _quantized_resnet(spec: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny_resnet").eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    fold_bn(model)
    quantize_model(model, QuantConfig.from_string(spec))
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))  # calibrates the activation steps
    return model


def _run(proto, x: torch.Tensor, optimize: bool = False) -> np.ndarray:
    # Without graph rewrites by default: the check is that the graph means what the model
    # computes.
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _out_step(model: nn.Module) -> float:
    """One output step: the last layer's input step times its largest |weight| row sum."""
    fc = model.fc
    w = fc.weight_quant(fc.weight).detach()
    return fc.act_quant.step.item() * w.abs().sum(1).max().item()


def _storage(proto) -> dict[tuple[str, int], set[str]]:
    """(kind, bits) -> storage types used, from the export's report."""
    found: dict[tuple[str, int], set[str]] = {}
    for e in qdq_report(proto):
        found.setdefault((e["kind"], e["bits"]), set()).add(e["storage"])
    return found


@pytest.mark.parametrize(
    ("spec", "int4"),
    [("w8a8", False), ("w4a4", False), ("w4a4", True), ("w2a4", True), ("w3a3", True)],
)
def test_ort_matches_fake_quant(spec: str, int4: bool, tmp_path) -> None:
    model = _quantized_resnet(spec)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    proto = export_qdq(model, (2, 3, 32, 32), path=tmp_path / "q.onnx", int4=int4)
    assert (tmp_path / "q.onnx").is_file()
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert np.abs(_run(proto, x) - expected).max() < _out_step(model)


@pytest.mark.parametrize("spec", ["w4a4", "w2a4", "w3a3"])
def test_int4_export_matches_when_optimised(spec: str) -> None:
    """Where the probe vouches for int4, the fully optimised runtime agrees too."""
    model = _quantized_resnet(spec)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    proto = export_qdq(model, (2, 3, 32, 32))
    if not any(s.endswith("int4") for kinds in _storage(proto).values() for s in kinds):
        pytest.skip("onnxruntime runs none of the 4-bit patterns correctly here")
    for optimize in (False, True):
        assert np.abs(_run(proto, x, optimize) - expected).max() < _out_step(model)


def test_default_export_matches_under_optimised_session() -> None:
    """The project's own session (all graph optimisations) agrees with the default export."""
    model = _quantized_resnet("w4a4")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort_session(export_qdq(model, (2, 3, 32, 32)))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4


def _low(pattern: str) -> str:
    return "int4" if int4_supported(pattern) else "int8"


def test_report_storage_follows_the_probe() -> None:
    proto = export_qdq(_quantized_resnet("w4a4"), (1, 3, 32, 32))
    report = qdq_report(proto)
    assert len(report) == 32  # 16 layers x (weight, input)
    edges = {"conv1.weight", "fc.weight", "conv1.act_quant", "fc.act_quant"}
    for entry in report:
        bits = 8 if entry["name"] in edges else 4
        assert entry["bits"] == bits
        low = _low("weight" if entry["kind"] == "weight" else "activation")
        assert entry["storage"] in ({"int8", "uint8"} if bits == 8 else {low, "u" + low})
        assert entry["storage"].startswith("u") != entry["signed"]
    four_bit = any(e["storage"].endswith("int4") for e in report)
    assert ({op.version for op in proto.opset_import if op.domain == ""} == {21}) == four_bit


def test_narrowed_activations_follow_their_own_probe() -> None:
    """3-bit inputs need a Clip in front of their Q: stored in 4 bits only where that
    pattern passed; the model loads under full optimisation either way."""
    model = _quantized_resnet("w3a3")
    proto = export_qdq(model, (2, 3, 32, 32))
    storage = _storage(proto)
    assert storage[("weight", 3)] <= {_low("weight")}
    assert storage[("activation", 3)] <= {
        _low("narrowed_activation"),
        "u" + _low("narrowed_activation"),
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_run(proto, x, optimize=True) - expected).max() < _out_step(model)


def test_int4_weights_take_half_the_bytes() -> None:
    if not int4_supported("weight"):
        pytest.skip("onnxruntime does not run int4 weights correctly here")
    model = _quantized_resnet("w4a4")
    packed = {t.name: t for t in export_qdq(model, (1, 3, 32, 32)).graph.initializer}
    plain = {t.name: t for t in export_qdq(model, (1, 3, 32, 32), int4=False).graph.initializer}
    four_bit = [n for n, t in packed.items() if t.data_type == TensorProto.INT4 and t.dims]
    assert "layer1.0.conv1.weight_quantized" in four_bit
    for name in four_bit:
        numel = int(np.prod(plain[name].dims))
        assert len(plain[name].raw_data) == numel
        assert len(packed[name].raw_data) == (numel + 1) // 2
        assert np.array_equal(
            numpy_helper.to_array(packed[name]), numpy_helper.to_array(plain[name])
        )
    assert (
        onnx_bytes(export_qdq(model, (1, 3, 32, 32))).initializer_bytes
        < onnx_bytes(export_qdq(model, (1, 3, 32, 32), int4=False)).initializer_bytes
    )


def test_sub4_bits_in_int8_storage() -> None:
    """Emulated narrow range: a 3-bit layer stored as int8 still matches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    quantize_model(model, QuantConfig(weight_bits=3, act_bits=3, first_last=None))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model(x)
        expected = model(x).numpy()
    proto = export_qdq(model, (2, 3, 12, 12), int4=False)
    assert {e["storage"] for e in qdq_report(proto)} == {"int8", "uint8"}
    assert "Clip" in [n.op_type for n in proto.graph.node]
    assert np.abs(_run(proto, x) - expected).max() < 1e-4


def test_uncalibrated_export_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    quantize_model(model, QuantConfig(first_last=None))
    with pytest.raises(ValueError, match="calibration"):
        export_qdq(model, (1, 3, 8, 8))


def test_an_exporter_that_drops_the_quantizers_is_refused() -> None:
    """Only the TorchScript exporter keeps the quantizer placeholders; a float graph from
    another one must not pass for a quantized student."""
    from archnet.errors import ArchnetError

    model = _quantized_resnet("w8a8")
    with pytest.raises(ArchnetError, match="lost .* quantizers"):
        export_qdq(model, (1, 3, 32, 32), exporter="dynamo/opset18")


@pytest.mark.parametrize(("spec", "int4"), [("w4a4", True), ("w4a4", False), ("w3a3", True)])
def test_zero_point_activations_export_exactly_and_verify(spec: str, int4: bool) -> None:
    """SiLU-fed inputs get a shifted unsigned grid: the QDQ graph carries its zero point,
    onnxruntime reproduces the fake-quant model and the checker proves the declared width."""
    from archnet.targets.qdq import VERIFIED, quantized_tensors
    from tests.targets.graphs import tiny_quantized_classifier

    config = QuantConfig.from_string(spec, first_last=None)
    model = tiny_quantized_classifier(nn.SiLU, config).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).numpy()
    proto = export_qdq(model, (8, 3, 16, 16), int4=int4)
    zero_points = [e["zero_point"] for e in qdq_report(proto) if e["kind"] == "activation"]
    assert zero_points[0] == 0, zero_points  # the image input is two-sided: signed
    if spec == "w4a4":  # at 3 bits a step can exceed twice SiLU's dip: rounded to zero
        assert all(z > 0 for z in zero_points[1:]), zero_points
    fc = model[6]
    step = fc.act_quant.step.item() * fc.weight_quant(fc.weight).abs().sum(1).max().item()
    for optimize in (False, True):
        assert np.abs(_run(proto, x, optimize) - expected).max() < step
    tensors = quantized_tensors(proto)
    assert all(t.declaration == VERIFIED for t in tensors), tensors
    bits = int(spec[-1])
    assert {t.bits for t in tensors if t.kind == "activation"} == {bits}
