"""QDQ export: onnxruntime reproduces the fake-quantized PyTorch model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from archnet.onnx_utils import ort_session
from archnet.quant import (
    QuantConfig,
    export_qdq,
    fold_bn,
    int4_supported,
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


def _run(proto, x: torch.Tensor) -> np.ndarray:
    # Without graph rewrites: the check is that the graph means what the model computes.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize(("spec", "int4"), [("w8a8", False), ("w4a4", False), ("w4a4", True)])
def test_ort_matches_fake_quant(spec: str, int4: bool, tmp_path) -> None:
    model = _quantized_resnet(spec)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    proto = export_qdq(model, (2, 3, 32, 32), path=tmp_path / "q.onnx", int4=int4)
    assert (tmp_path / "q.onnx").is_file()
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # One output step: the last layer's input step times its largest |weight| row sum.
    fc = model.fc
    w = fc.weight_quant(fc.weight).detach()
    out_step = fc.act_quant.step.item() * w.abs().sum(1).max().item()
    assert np.abs(_run(proto, x) - expected).max() < out_step


def test_default_export_matches_under_optimised_session() -> None:
    """The project's own session (all graph optimisations) agrees with the default export."""
    model = _quantized_resnet("w4a4")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort_session(export_qdq(model, (2, 3, 32, 32)))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_report_storage() -> None:
    proto = export_qdq(_quantized_resnet("w4a4"), (1, 3, 32, 32), int4=True)
    report = qdq_report(proto)
    assert len(report) == 32  # 16 layers x (weight, input)
    low = "int4" if int4_supported() else "int8"
    edges = {"conv1.weight", "fc.weight", "conv1.act_quant", "fc.act_quant"}
    for entry in report:
        bits = 8 if entry["name"] in edges else 4
        assert entry["bits"] == bits
        assert entry["storage"] in ({"int8", "uint8"} if bits == 8 else {low, "u" + low})
        assert entry["storage"].startswith("u") != entry["signed"]


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
