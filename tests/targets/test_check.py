"""The target check: forbidden operators and broken rules with the node, the offending value
and the source module; declared bit widths the graph does not prove; and what could not be
verified, which fails the check unless allowed."""

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

from archnet.onnx_utils import export_onnx, legacy_exporter_available
from archnet.quant import QuantConfig, calibrate, export_qdq, quantize_model
from archnet.quant.baselines import ptq_onnxruntime
from archnet.targets import (
    CheckReport,
    Unverified,
    Violation,
    check_model,
    check_report,
    load_target,
)
from archnet.targets import check as check_module
from archnet.targets.check import format_unverified, format_violation, rejects
from archnet.targets.qdq import quantized_tensors
from tests.targets.graphs import (
    ARCHNET,
    ARCHNET_INT,
    GraphBuilder,
    activation_graph,
    compliant,
    computed_weight_conv,
    declare,
    int_weight,
    lying_declaration,
    npu,
    only,
    prepared_conv_net,
    qdq_compliant,
    qdq_conv,
    quantize_input,
)

CPU_ORT = load_target("cpu-ort")


def test_compliant_graph_passes() -> None:
    model = compliant().model()
    report = check_report(model, ARCHNET)
    assert report == CheckReport("archnet-5op", len(model.graph.node), (), (), ())
    assert report.passed() and check_model(model, npu()) == []


@pytest.mark.parametrize("op", ["Sigmoid", "Add"])
def test_forbidden_op(op: str) -> None:
    g = GraphBuilder()
    g.conv("/layer1/layer1.0/conv1/Conv", 8, 8)
    inputs = [g.last, g.last] if op == "Add" else None
    g.add(op, f"/layer1/layer1.0/{op}", inputs)
    v = only(check_model(g.model(), npu()))
    assert (v.node, v.op_type, v.attribute, v.module) == (
        f"/layer1/layer1.0/{op}",
        op,
        None,
        "layer1.0",
    )
    assert v.reason == f"operator {op} is not allowed by npu"


def test_format_violation_and_unverified() -> None:
    v = Violation(
        "/a/Conv", "Conv", "kernel_shape=[7, 7] is not allowed", "kernel_shape=[7, 7]", "a"
    )
    assert format_violation(v) == "/a/Conv (Conv) [from a]: kernel_shape=[7, 7] is not allowed"
    assert format_violation(Violation("", "Add", "no")) == "<unnamed> (Add): no"
    assert str(v) == format_violation(v)
    u = Unverified("/a/Conv", "Conv", "conv_kernel_shapes", "kernel_shape unknown", "a")
    assert (
        str(u)
        == format_unverified(u)
        == "/a/Conv (Conv) [from a]: unverified: kernel_shape unknown"
    )


def test_removed_nodes_are_not_checked() -> None:
    """The exporter routes shared initializers through Identity; compilers remove such nodes."""
    g = GraphBuilder()
    g.weight("shared", (8, 8, 5, 5))
    g.nodes.append(helper.make_node("Identity", ["shared"], ["w2"], name="Identity_0"))
    g.nodes.append(helper.make_node("Constant", [], ["one"], name="Constant_0", value_float=1.0))
    g.add("Conv", "/c/Conv", [g.last, "w2"], pads=[2, 2, 2, 2])  # kernel read through Identity
    found = [(v.node, v.attribute) for v in check_model(g.model(), npu())]
    assert found == [("/c/Conv", "kernel_shape=[5, 5]")]


class Block(nn.Module):
    """A MobileNet-style piece: 1x1 conv and SiLU, which Arch-Net's chips do not run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(3, 8, 1)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.conv_pw(x)))


def test_real_export_against_archnet_5op() -> None:
    model = nn.Sequential(Block(), nn.ReLU())
    report = check_report(export_onnx(model, (1, 3, 8, 8)), ARCHNET)
    violations = list(report.violations)
    kernel = [v for v in violations if v.attribute == "kernel_shape=[1, 1]"]
    assert len(kernel) == 1 and kernel[0].op_type == "Conv"
    assert kernel[0].module == "0.conv_pw"
    silu = [v for v in violations if v.attribute is None]
    assert silu and {v.module for v in silu} == {"0.act"}
    assert {v.op_type for v in silu} <= {"Sigmoid", "Mul", "Silu"}
    assert len(violations) == 1 + len(silu)
    assert report.unverified == ()  # an exported graph shows every value the rules need
    reason = rejects(ARCHNET, model, (1, 3, 8, 8))
    assert reason and "kernel_shape=[1, 1]" in reason and "is not allowed by archnet-5op" in reason


def test_rejects_allows_compliant_module_and_open_target() -> None:
    good = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        # fresh BatchNorms fold to equal biases, which the exporter shares through Identity
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    exported = export_onnx(good, (1, 3, 8, 8))
    if legacy_exporter_available():  # the TorchScript exporter shares equal initializers
        assert "Identity" in {n.op_type for n in exported.graph.node}
    assert check_report(exported, ARCHNET).passed()
    assert rejects(ARCHNET, good, (1, 3, 8, 8)) is None
    assert rejects(CPU_ORT, nn.SiLU(), (1, 3, 8, 8)) is None
    assert rejects(ARCHNET, nn.Identity(), (1, 3, 8, 8)) is None  # a skipped block


def test_rejects_counts_unverified_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate whose export hides a value a rule needs never enters a pool."""
    monkeypatch.setattr(
        check_module, "export_any", lambda *args, **kwargs: computed_weight_conv().raw()
    )
    reason = rejects(ARCHNET, nn.Identity(), (1, 8, 16, 16))
    assert reason and reason.startswith("unverified: kernel_shape unknown")


def test_rejects_on_integer_target_checks_the_qdq_export() -> None:
    """A candidate is checked as it will run: float compute fails an integer-only target, the
    same layers quantized (exported as QDQ) pass, and the kernel rules still apply."""
    float_block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    reason = rejects(ARCHNET_INT, float_block, (1, 3, 8, 8))
    assert reason and "float compute" in reason
    assert rejects(ARCHNET, float_block, (1, 3, 8, 8)) is None
    wide = nn.Sequential(nn.Conv2d(3, 8, 5))
    for module in (float_block, wide):
        quantize_model(module, QuantConfig(4, 4, None))
        calibrate(module, torch.randn(2, 3, 8, 8))
    assert rejects(ARCHNET_INT, float_block, (1, 3, 8, 8)) is None
    reason = rejects(ARCHNET_INT, wide, (1, 3, 8, 8))
    assert reason and "kernel_shape=[5, 5]" in reason and "float compute" not in reason


# --- quantized graphs -----------------------------------------------------------------------------


def test_qdq_graph_passes_archnet_5op() -> None:
    model = qdq_compliant().model()
    annotations = {"QuantizeLinear", "DequantizeLinear", "Clip"}
    assert annotations <= {n.op_type for n in model.graph.node}
    assert ARCHNET.allowed_ops is not None and not annotations & ARCHNET.allowed_ops
    assert check_report(model, ARCHNET).passed()
    assert check_report(model, ARCHNET_INT).passed()


@pytest.mark.parametrize("kernel_attr", [True, False])
def test_qdq_conv_kernel_rule_still_applies(kernel_attr: bool) -> None:
    """Without a kernel_shape attribute the kernel is read through DequantizeLinear to the
    integer initializer, even where shape inference gives nothing (an op it does not know)."""
    g = GraphBuilder()
    qdq_conv(g, "/big/Conv", 8, 8, k=5, act_bits=4, kernel_attr=kernel_attr)
    g.add("Frob", "/f/Frob", domain="acme")
    model = g.raw()
    model.opset_import.append(helper.make_opsetid("acme", 1))
    found = [(v.node, v.op_type, v.attribute) for v in check_model(model, ARCHNET)]
    assert found == [("/big/Conv", "Conv", "kernel_shape=[5, 5]"), ("/f/Frob", "Frob", None)]


def test_clip_that_is_not_a_quantization_annotation_is_an_op() -> None:
    """Only a Clip with constant bounds feeding QuantizeLinear alone narrows a quantized tensor."""
    g = GraphBuilder()
    for name in ("lo", "hi"):
        g.const(name, np.float32(1.0))
    clipped = g.add("Clip", "/act/Clip", ["x", "lo", "hi"])  # a ReLU6-like activation
    g.conv("/c/Conv", 8, 8)
    g.add("Clip", "/dyn/Clip", [g.last, "x"])  # computed bound, although it feeds a Q
    q = quantize_input(g, "q")
    g.add("Concat", "/Concat", [clipped, q], axis=1)
    found = [(v.node, v.op_type) for v in check_model(g.model(), ARCHNET)]
    assert found == [("/act/Clip", "Clip"), ("/dyn/Clip", "Clip")]


def test_quantized_only_flags_float_compute() -> None:
    target = npu(quantized_only=True)
    model = compliant().model()
    violations = check_model(model, target)
    compute = [n for n in model.graph.node if n.op_type in {"Conv", "Gemm"}]
    assert [v.node for v in violations] == [n.name for n in compute for _ in range(2)]
    first = violations[0]
    assert first.reason == (
        "float compute: input 'x' is not dequantized from an integer tensor "
        "(npu rules.quantized_only = true)"
    )
    assert first.attribute == "input=x"
    assert check_model(model, npu()) == []  # the same graph is fine for a float chip
    assert check_model(qdq_compliant().model(), target) == []


def test_quantized_only_names_the_float_operand() -> None:
    """A quantized weight does not make a float input integer."""
    g = GraphBuilder()
    g.add("Conv", "/c/Conv", ["x", int_weight(g, "w", (8, 8, 3, 3))], kernel_shape=[3, 3])
    v = only(check_model(g.model(), npu(quantized_only=True)))
    assert (v.node, v.attribute) == ("/c/Conv", "input=x")


def test_genuine_4bit_export_passes_the_integer_target() -> None:
    proto = export_qdq(prepared_conv_net("w4a4"), (1, 3, 16, 16))
    report = check_report(proto, ARCHNET_INT)
    assert report.passed(), (report.violations, report.unverified)
    assert {t.declared_bits for t in report.tensors} == {4}


@pytest.mark.parametrize("target", [CPU_ORT, ARCHNET_INT], ids=lambda t: t.name)
def test_rewritten_declaration_is_a_violation_on_every_target(target) -> None:
    """Rewrite a 4-bit weight's declaration to 2: the graph still stores 4-bit integers."""
    lie, entry = lying_declaration()
    v = only(check_model(lie, target))
    assert (v.op_type, v.attribute, v.module) == (
        "DequantizeLinear",
        "bits=4",
        entry["name"].rsplit(".", 1)[0],
    )
    assert v.reason.startswith(f"weight '{entry['tensor']}' is declared 2-bit but the graph ")
    assert "integers in [-8, 7] (4 bits)" in v.reason


def test_activation_declared_4bit_without_clip_is_a_violation() -> None:
    model = declare(activation_graph(None).model(), [{"tensor": "x", "bits": 4}])
    v = only(check_model(model, CPU_ORT))
    assert (v.node, v.op_type) == ("/a/Q", "QuantizeLinear")
    assert "activation 'x' is declared 4-bit" in v.reason and "[-128, 127]" in v.reason


def test_computed_clip_bound_is_unverified() -> None:
    model = declare(activation_graph("computed").model(), [{"tensor": "x", "bits": 4}])
    report = check_report(model, CPU_ORT)
    assert report.violations == ()
    (u,) = report.unverified
    assert (u.node, u.op_type, u.rule) == ("/a/Q", "QuantizeLinear", "declared_bits")
    assert "Clip '/a/Clip'" in u.reason and "computed" in u.reason
    assert not report.passed() and report.passed(allow_unverified=True)
    # a Clip is no annotation when its bound is computed: a chip without Clip cannot run it
    assert [v.op_type for v in check_model(model, ARCHNET)] == ["ReduceMax", "Clip"]


def test_declaration_of_a_tensor_the_graph_lacks() -> None:
    model = declare(qdq_compliant().model(), [{"tensor": "ghost", "bits": 4}])
    v = only(check_model(model, CPU_ORT))
    assert (v.node, v.op_type, v.attribute) == ("archnet.qdq", "metadata", "declared_bits=4")
    assert "'ghost'" in v.reason


def test_onnxruntime_static_quantization_is_read_from_the_graph() -> None:
    """A model from onnxruntime's quantize_static declares nothing: every width is read from
    the graph (int8 weights spanning the grid, uint8 activations, int32 biases)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    proto = ptq_onnxruntime(model, torch.randn(4, 3, 8, 8), (1, 3, 8, 8))
    report = check_report(proto, CPU_ORT)
    assert report.passed() and report.tensors == tuple(quantized_tensors(proto))
    assert report.tensors and all(t.declared_bits is None for t in report.tensors)
    widths = {(t.kind, t.storage, t.bits) for t in report.tensors if t.storage != "int32"}
    assert widths == {("weight", "int8", 8), ("activation", "uint8", 8)}
    biases = [t for t in report.tensors if t.storage == "int32"]
    assert biases and all(8 < t.bits < 32 for t in biases)
