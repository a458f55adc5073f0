"""Tiny ONNX graphs for the checker's tests, built node by node with onnx.helper."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from archnet.quant import QuantConfig, calibrate, prepare_qat, quant_range, quantize_model
from archnet.quant.modules import QuantModule
from archnet.targets import Target, Violation, load_target

ARCHNET = load_target("archnet-5op")
ARCHNET_INT = load_target("archnet-5op-int")
SCALE = 0.05


def npu(extra_ops: frozenset[str] = frozenset(), **rules: object) -> Target:
    """archnet-5op with ``max_channels = 64``; ``rules`` replace single rules."""
    assert ARCHNET.allowed_ops is not None
    return replace(
        ARCHNET,
        name="npu",
        allowed_ops=ARCHNET.allowed_ops | extra_ops,
        rules=replace(ARCHNET.rules, **{"max_channels": 64, **rules}),
    )


class GraphBuilder:
    """A float NCHW graph built node by node; weights become initializers."""

    def __init__(self, channels: int = 8, size: int = 16) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])
        self.inputs = [x]
        self.last = "x"

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        self.inits.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))
        return name

    def const(self, name: str, value: np.ndarray | np.generic) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def add(self, op: str, name: str, inputs: list[str] | None = None, **attrs: object) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs or [self.last], [out], name=name, **attrs))
        self.last = out
        return out

    def conv(
        self,
        name: str,
        c_in: int,
        c_out: int,
        k: int = 3,
        group: int = 1,
        kernel_attr: bool = True,
        **attrs: object,
    ) -> str:
        w = self.weight(f"{name}.weight", (c_out, c_in // group, k, k))
        if kernel_attr:
            attrs["kernel_shape"] = [k, k]
        pad = (k - 1) // 2 * attrs.get("dilations", [1])[0]
        return self.add("Conv", name, [self.last, w], group=group, pads=[pad] * 4, **attrs)

    def raw(self, opset: int = 17) -> onnx.ModelProto:
        """The graph as built, without shape inference."""
        out = onnx.ValueInfoProto(name=self.last)
        graph = helper.make_graph(self.nodes, "g", self.inputs, [out], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    def model(self) -> onnx.ModelProto:
        """The graph, its output typed by shape inference (the checker wants a typed output)."""
        model = onnx.shape_inference.infer_shapes(self.raw())
        onnx.checker.check_model(model)
        return model


def compliant() -> GraphBuilder:
    """3x3 conv, ReLU, 2x2 max-pool, concat, global average pool, flatten, fully connected."""
    g = GraphBuilder()
    g.conv("/stem/Conv", 8, 16)
    g.add("Relu", "/stem/act/Relu")
    b = g.add("MaxPool", "/pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    g.conv("/branch/Conv", 16, 16, strides=[1, 1], dilations=[1, 1])
    g.add("Concat", "/Concat", [b, g.last], axis=1)
    g.add("GlobalAveragePool", "/gap/GlobalAveragePool")
    g.add("Flatten", "/Flatten", axis=1)
    g.add("Gemm", "/fc/Gemm", [g.last, g.weight("fc.weight", (10, 32))], transB=1)
    return g


def only(violations: list[Violation]) -> Violation:
    assert len(violations) == 1, violations
    return violations[0]


# --- quantized (QDQ) graphs -----------------------------------------------------------------------


def storage(signed: bool) -> tuple[int, type[np.integer]]:
    return (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)


def quantize_input(g: GraphBuilder, name: str, bits: int = 8, signed: bool = False) -> str:
    """``[Clip ->] QuantizeLinear -> DequantizeLinear`` on ``g.last``, as archnet exports an
    activation: a Clip to the ``bits``-bit grid when that is narrower than 8-bit storage."""
    _, dtype = storage(signed)
    g.const(f"{name}_scale", np.float32(SCALE))
    g.const(f"{name}_zp", np.zeros((), dtype))
    q_in = g.last
    if bits < 8:
        qmin, qmax = quant_range(bits, signed)
        g.const(f"{name}_lo", np.float32(qmin * SCALE))
        g.const(f"{name}_hi", np.float32(qmax * SCALE))
        q_in = g.add("Clip", f"{name}_clip", [q_in, f"{name}_lo", f"{name}_hi"])
    q = g.add("QuantizeLinear", f"{name}_q", [q_in, f"{name}_scale", f"{name}_zp"])
    return g.add("DequantizeLinear", f"{name}_dq", [q, f"{name}_scale", f"{name}_zp"])


def int_weight(
    g: GraphBuilder,
    name: str,
    shape: tuple[int, ...],
    lo: int = -128,
    hi: int = 127,
    signed: bool = True,
) -> str:
    """Stored int8 (uint8) integers spanning exactly ``[lo, hi]`` behind a per-channel
    DequantizeLinear; ``g.last`` is left alone so that the weight can feed the next node."""
    _, dtype = storage(signed)
    values = np.random.default_rng(0).integers(lo, hi + 1, shape)
    values.flat[0], values.flat[-1] = lo, hi
    g.const(f"{name}_quantized", values.astype(dtype))
    g.const(f"{name}_scale", np.full(shape[0], SCALE, np.float32))
    g.const(f"{name}_zp", np.zeros(shape[0], dtype))
    out = f"{name}_dq_out"
    inputs = [f"{name}_quantized", f"{name}_scale", f"{name}_zp"]
    g.nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=f"{name}_dq", axis=0))
    return out


def qdq_conv(
    g: GraphBuilder,
    name: str,
    c_in: int,
    c_out: int,
    k: int = 3,
    act_bits: int = 8,
    kernel_attr: bool = True,
) -> str:
    """A convolution as a QDQ exporter writes it: quantized input, integer weight."""
    x = quantize_input(g, f"{name}.input", act_bits)
    w = int_weight(g, f"{name}.weight", (c_out, c_in, k, k))
    attrs: dict[str, object] = {"kernel_shape": [k, k]} if kernel_attr else {}
    return g.add("Conv", name, [x, w], pads=[(k - 1) // 2] * 4, **attrs)


def qdq_compliant() -> GraphBuilder:
    """The compliant graph of archnet-5op quantized: 4-bit (Clip-narrowed) and 8-bit tensors."""
    g = GraphBuilder()
    qdq_conv(g, "/stem/Conv", 8, 16, act_bits=4)
    g.add("Relu", "/stem/act/Relu")
    qdq_conv(g, "/body/Conv", 16, 16, act_bits=4)
    g.add("Relu", "/body/act/Relu")
    g.add("GlobalAveragePool", "/gap/GlobalAveragePool")
    g.add("Flatten", "/Flatten", axis=1)
    x = quantize_input(g, "fc.input")
    g.add("Gemm", "/fc/Gemm", [x, int_weight(g, "fc.weight", (10, 16))], transB=1)
    return g


def declare(model: onnx.ModelProto, entries: list[dict[str, object]]) -> onnx.ModelProto:
    """``model`` with bit widths declared in its metadata the way archnet's exporter does."""
    import json

    from archnet.quant.export import REPORT_KEY

    helper.set_model_props(model, {REPORT_KEY: json.dumps(entries)})
    return model


def activation_graph(clip: str | None) -> GraphBuilder:
    """x -> [Clip] -> int8 QuantizeLinear -> DequantizeLinear -> Relu; ``clip`` is "constant"
    (to the 4-bit grid) or "computed" (its max is a run-time tensor)."""
    g = GraphBuilder()
    g.const("s", np.float32(SCALE))
    g.const("zp", np.int8(0))
    q_in = "x"
    if clip == "constant":
        g.const("lo", np.float32(-8 * SCALE))
        g.const("hi", np.float32(7 * SCALE))
        q_in = g.add("Clip", "/a/Clip", ["x", "lo", "hi"])
    elif clip == "computed":
        g.const("lo", np.float32(-8 * SCALE))
        hi = g.add("ReduceMax", "/a/ReduceMax", ["x"], keepdims=0)
        q_in = g.add("Clip", "/a/Clip", ["x", "lo", hi])
    q = g.add("QuantizeLinear", "/a/Q", [q_in, "s", "zp"])
    g.add("DequantizeLinear", "/a/DQ", [q, "s", "zp"])
    g.add("Relu", "/r/Relu")
    return g


def computed_weight_conv(kernel_attr: bool = False, group: int = 1) -> GraphBuilder:
    """A Conv whose weight is reshaped at run time to a shape given as a graph input, so that
    no initializer and no shape inference tells its kernel or channels."""
    g = GraphBuilder()
    g.const("flat", np.zeros(8 * 8 // group * 9, np.float32))
    g.inputs.append(helper.make_tensor_value_info("wshape", TensorProto.INT64, [4]))
    w = g.add("Reshape", "/w/Reshape", ["flat", "wshape"])
    attrs: dict[str, object] = {"kernel_shape": [3, 3]} if kernel_attr else {}
    g.add("Conv", "/c/Conv", ["x", w], pads=[1, 1, 1, 1], group=group, **attrs)
    return g


# --- real quantized exports -----------------------------------------------------------------------


def tiny_quantized_classifier(
    act: type[nn.Module] = nn.ReLU, config: QuantConfig | None = None
) -> nn.Module:
    """Conv, conv, pool, linear quantized w4a4 (or ``config``), the first and last layer at 8
    bits, calibrated on 8 random 16x16 images."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        act(),
        nn.Conv2d(8, 8, 3, padding=1),
        act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    quantize_model(model, config or QuantConfig(4, 4, (8, 8)))
    calibrate(model, torch.randn(8, 3, 16, 16))
    return model


def prepared_conv_net(spec: str = "w4a4") -> nn.Module:
    """A conv-BN-ReLU net made ready for quantization-aware training as the pipeline does
    (``prepare_qat``: BatchNorm folded, layers swapped, steps calibrated), every layer at
    ``spec``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    return prepare_qat(model, QuantConfig.from_string(spec, None), torch.randn(8, 3, 16, 16))


def saturate_weights(model: nn.Module) -> None:
    """Push two weights per layer past either end of their clamp, as trained LSQ layers do: the
    stored integers then span the whole grid, which is all the graph can show of the width."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantModule):
                far = m.weight_quant.step.max() * 2**10
                m.weight.view(-1)[0], m.weight.view(-1)[1] = far, -far


def lying_declaration() -> tuple[onnx.ModelProto, dict[str, object]]:
    """A genuine 4-bit export whose metadata declares one of its 4-bit weights 2-bit; the
    model and the rewritten entry."""
    from archnet.quant import export_qdq, qdq_report

    model = tiny_quantized_classifier()
    saturate_weights(model)
    proto = export_qdq(model, (1, 3, 16, 16))
    report = qdq_report(proto)
    entry = next(r for r in report if r["kind"] == "weight" and r["bits"] == 4)
    entry["bits"] = 2
    return declare(proto, report), entry
