"""Target checks on ONNX graphs: every broken operator or attribute rule is reported once, with
the node, the offending value and the PyTorch module it came from."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from archnet import cli
from archnet.cli import main
from archnet.onnx_utils import export_onnx, legacy_exporter_available
from archnet.quant import (
    QuantConfig,
    calibrate,
    export_qdq,
    qdq_report,
    quant_range,
    quantize_model,
)
from archnet.quant.modules import QuantModule
from archnet.targets import Target, load_target, opset
from archnet.targets.opset import (
    _GROUPS,
    COMPUTE_OPS,
    QuantizedTensor,
    Violation,
    check_model,
    float_compute_nodes,
    format_violation,
    module_of,
    quantized_tensors,
    rejects,
)
from archnet.targets.target import CONV_GROUPS, Rules

ARCHNET = load_target("archnet-5op")
ARCHNET_INT = load_target("archnet-5op-int")


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

    def model(self) -> onnx.ModelProto:
        """The graph, its output typed by shape inference (the checker wants a typed output)."""
        out = onnx.ValueInfoProto(name=self.last)
        graph = helper.make_graph(self.nodes, "g", self.inputs, [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model = onnx.shape_inference.infer_shapes(model)
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


def test_compliant_graph_has_no_violations() -> None:
    assert check_model(compliant().model(), npu()) == []
    assert check_model(compliant().model(), load_target("archnet-5op")) == []


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


CONV_CASES = {
    "7x7 kernel": ({"k": 7}, "conv_kernel_shapes", "kernel_shape=[7, 7]"),
    "kernel from weight": (
        {"k": 5, "kernel_attr": False},
        "conv_kernel_shapes",
        "kernel_shape=[5, 5]",
    ),
    "stride 3": ({"strides": [3, 3]}, "conv_strides", "strides=[3, 3]"),
    "dilated": ({"dilations": [2, 2]}, "conv_dilations", "dilations=[2, 2]"),
    "depthwise under dense": ({"group": 8}, "conv_groups", "group=8"),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_attribute_rules(case: str) -> None:
    kwargs, rule, attribute = CONV_CASES[case]
    g = GraphBuilder()
    g.conv("/blocks.0/conv_pw/Conv", 8, 8, **kwargs)
    v = only(check_model(g.model(), npu()))
    assert (v.op_type, v.attribute, v.module) == ("Conv", attribute, "blocks.0.conv_pw")
    assert f"rules.{rule}" in v.reason and attribute in v.reason


def test_conv_groups_modes() -> None:
    def groups(group: int, c_in: int = 8, c_out: int = 8) -> onnx.ModelProto:
        g = GraphBuilder()
        g.conv("dw", c_in, c_out, group=group)
        return g.model()

    depthwise, grouped = groups(8), groups(2)
    assert check_model(depthwise, npu(conv_groups="depthwise")) == []
    assert only(check_model(grouped, npu(conv_groups="depthwise"))).attribute == "group=2"
    assert check_model(grouped, npu(conv_groups="any")) == []
    assert check_model(grouped, npu(conv_groups=None)) == []
    assert set(_GROUPS) == set(CONV_GROUPS)


def test_several_broken_rules_on_one_node() -> None:
    g = GraphBuilder()
    g.conv("c", 8, 8, k=7, strides=[3, 3])
    assert {v.attribute for v in check_model(g.model(), npu())} == {
        "kernel_shape=[7, 7]",
        "strides=[3, 3]",
    }


def test_pool_rules() -> None:
    g = GraphBuilder()
    g.add("MaxPool", "/pool/MaxPool", kernel_shape=[3, 3], strides=[2, 2])
    g.add("MaxPool", "/pool2/MaxPool", kernel_shape=[2, 2])  # strides default to 1
    g.add("AveragePool", "/avg/AveragePool", kernel_shape=[2, 2], strides=[2, 2])
    g.add("GlobalAveragePool", "/gap/GlobalAveragePool")
    found = [(v.node, v.attribute) for v in check_model(g.model(), npu())]
    assert found == [
        ("/pool/MaxPool", "kernel_shape=[3, 3]"),
        ("/pool2/MaxPool", "strides=[1, 1]"),
        ("/avg/AveragePool", None),  # AveragePool is not in the operator set
    ]
    avg_allowed = npu(frozenset({"AveragePool"}), pool_kernel_shapes=((2, 2), (3, 3)))
    assert [v.attribute for v in check_model(g.model(), avg_allowed)] == ["strides=[1, 1]"]
    pools_open = npu(pool_kernel_shapes=None, pool_strides=None)
    assert [v.op_type for v in check_model(g.model(), pools_open)] == ["AveragePool"]


def test_average_pool_attribute_rules_when_allowed() -> None:
    g = GraphBuilder()
    g.add("AveragePool", "/avg/AveragePool", kernel_shape=[3, 3], strides=[1, 1])
    target = npu(frozenset({"AveragePool"}))
    assert [v.attribute for v in check_model(g.model(), target)] == [
        "kernel_shape=[3, 3]",
        "strides=[1, 1]",
    ]


def test_max_channels_conv() -> None:
    g = GraphBuilder(channels=8)
    g.conv("/wide/Conv", 8, 128)
    g.conv("/back/Conv", 128, 8)
    found = [(v.node, v.attribute) for v in check_model(g.model(), npu())]
    assert found == [("/wide/Conv", "out_channels=128"), ("/back/Conv", "in_channels=128")]
    assert "rules.max_channels = 64" in check_model(g.model(), npu())[0].reason
    assert check_model(g.model(), npu(max_channels=128)) == []


def test_max_channels_conv_without_weight_initializer() -> None:
    """Channels come from shape inference when the weight is a graph input."""
    g = GraphBuilder(channels=100)
    g.inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 100, 3, 3]))
    g.add("Conv", "/c/Conv", ["x", "w"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    assert only(check_model(g.model(), npu())).attribute == "in_channels=100"


def test_max_channels_gemm_and_matmul() -> None:
    g = GraphBuilder(channels=8, size=1)
    g.add("Flatten", "/Flatten", axis=1)
    g.add("Gemm", "/fc1/Gemm", [g.last, g.weight("fc1.weight", (100, 8))], transB=1)
    g.add("Gemm", "/fc2/Gemm", [g.last, g.weight("fc2.weight", (100, 10))])
    found = [(v.node, v.attribute) for v in check_model(g.model(), npu())]
    assert found == [("/fc1/Gemm", "out_features=100"), ("/fc2/Gemm", "in_features=100")]

    target = npu(frozenset({"MatMul"}))
    m = GraphBuilder(channels=8, size=1)
    m.add("Flatten", "/Flatten", axis=1)
    m.add("MatMul", "/proj/MatMul", [m.last, m.weight("proj.weight", (8, 65))])
    assert only(check_model(m.model(), target)).attribute == "out_features=65"


def test_open_target_checks_nothing() -> None:
    g = GraphBuilder()
    g.conv("c", 8, 8, k=7)
    g.add("Sigmoid", "s")
    assert check_model(g.model(), load_target("cpu-ort")) == []
    ops_only = Target("ops", "", "onnxruntime", "cpu", 1, allowed_ops=ARCHNET.allowed_ops)
    assert [v.op_type for v in check_model(g.model(), ops_only)] == ["Sigmoid"]
    rules_only = Target("rules", "", "onnxruntime", "cpu", 1, rules=Rules(max_channels=4))
    assert {v.attribute for v in check_model(g.model(), rules_only)} == {
        "in_channels=8",
        "out_channels=8",
    }


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("/layer1.0/conv1/Conv", "layer1.0.conv1"),
        ("/blocks.0/conv_pw/Conv", "blocks.0.conv_pw"),
        ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),  # as the TorchScript exporter writes
        ("/blocks/blocks.0/blocks/blocks.0/Relu", "blocks.0.blocks.0"),
        ("/features/features.0/features.0.1/Conv", "features.0.1"),
        ("/0/Conv", "0"),
        ("/stem/Conv_1", "stem"),
        ("/Flatten", None),
        ("Conv_0", None),
        ("", None),
    ],
)
def test_module_names(name: str, module: str | None) -> None:
    assert module_of(helper.make_node("Relu", ["a"], ["b"], name=name)) == module


def test_module_from_dynamo_metadata() -> None:
    node = helper.make_node("Conv", ["a", "w"], ["b"], name="node_conv2d_1")
    helper.set_metadata_props(
        node,
        {
            "pkg.torch.onnx.name_scopes": "['', 'blocks', 'blocks.0', 'blocks.0.conv_pw', "
            "'conv2d_1']"
        },
    )
    assert module_of(node) == "blocks.0.conv_pw"


def test_format_violation() -> None:
    v = Violation(
        "/a/Conv", "Conv", "kernel_shape=[7, 7] is not allowed", "kernel_shape=[7, 7]", "a"
    )
    assert format_violation(v) == "/a/Conv (Conv) [from a]: kernel_shape=[7, 7] is not allowed"
    assert format_violation(Violation("", "Add", "no")) == "<unnamed> (Add): no"
    assert str(v) == format_violation(v)


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
    target = load_target("archnet-5op")
    violations = check_model(export_onnx(model, (1, 3, 8, 8)), target)
    kernel = [v for v in violations if v.attribute == "kernel_shape=[1, 1]"]
    assert len(kernel) == 1 and kernel[0].op_type == "Conv"
    assert kernel[0].module == "0.conv_pw"
    silu = [v for v in violations if v.attribute is None]
    assert silu and {v.module for v in silu} == {"0.act"}
    assert {v.op_type for v in silu} <= {"Sigmoid", "Mul", "Silu"}
    assert len(violations) == 1 + len(silu)
    reason = rejects(target, model, (1, 3, 8, 8))
    assert reason and "kernel_shape=[1, 1]" in reason and "is not allowed by archnet-5op" in reason


def test_removed_nodes_are_not_checked() -> None:
    """The exporter routes shared initializers through Identity; compilers remove such nodes."""
    g = GraphBuilder()
    g.weight("shared", (8, 8, 5, 5))
    g.nodes.append(helper.make_node("Identity", ["shared"], ["w2"], name="Identity_0"))
    g.nodes.append(helper.make_node("Constant", [], ["one"], name="Constant_0", value_float=1.0))
    g.add("Conv", "/c/Conv", [g.last, "w2"], pads=[2, 2, 2, 2])  # kernel read through Identity
    found = [(v.node, v.attribute) for v in check_model(g.model(), npu())]
    assert found == [("/c/Conv", "kernel_shape=[5, 5]")]


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
    assert check_model(exported, ARCHNET) == []
    assert rejects(ARCHNET, good, (1, 3, 8, 8)) is None
    assert rejects(load_target("cpu-ort"), nn.SiLU(), (1, 3, 8, 8)) is None
    assert rejects(ARCHNET, nn.Identity(), (1, 3, 8, 8)) is None  # a skipped block


def test_cli_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save_model(compliant().model(), str(good))
    g = GraphBuilder()
    g.conv("/blocks.0/conv_pw/Conv", 8, 8, k=7)
    g.add("Sigmoid", "/blocks.0/act/Sigmoid")
    onnx.save_model(g.model(), str(bad))

    assert main(["check", str(good), "--target", "archnet-5op"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines() == ["0 violation(s) of archnet-5op in 8 nodes"]

    assert main(["check", str(bad), "--target", "archnet-5op"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("/blocks.0/conv_pw/Conv (Conv) [from blocks.0.conv_pw]: ")
    assert "kernel_shape=[7, 7]" in lines[0]
    assert lines[1].startswith("/blocks.0/act/Sigmoid (Sigmoid) [from blocks.0.act]: ")
    assert lines[2] == "2 violation(s) of archnet-5op in 2 nodes"


def test_cli_check_user_profile_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(compliant().model(), str(model))
    profile = tmp_path / "chip.toml"
    profile.write_text(
        'name = "chip"\n[latency]\nbackend = "onnxruntime"\n[rules]\nmax_channels = 16\n',
        encoding="utf-8",
    )
    assert main(["check", str(model), "--target", str(profile)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "/fc/Gemm (Gemm) [from fc]: in_features=32 is not allowed (chip rules.max_channels = 16)",
        "1 violation(s) of chip in 8 nodes",
    ]
    assert main(["check", str(tmp_path / "absent.onnx"), "--target", "archnet-5op"]) == 2
    assert "absent.onnx" in capsys.readouterr().err


def test_cli_targets_lists_archnet_5op(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.out, "width", 200)  # at 80 columns the table shortens names
    assert main(["targets"]) == 0
    names = {
        line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines() if "│" in line
    }
    assert {"archnet-5op", "archnet-5op-int"} <= names


# --- quantized (QDQ) graphs ----------------------------------------------------------------

SCALE = 0.05


def storage(signed: bool) -> tuple[int, type[np.integer]]:
    return (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)


def quantize_input(g: GraphBuilder, name: str, bits: int = 8, signed: bool = False) -> str:
    """``[Clip ->] QuantizeLinear -> DequantizeLinear`` on ``g.last``, as archnet exports an
    activation: a Clip to the ``bits``-bit grid when that is narrower than 8-bit storage."""
    _, dtype = storage(signed)
    g.inits.append(numpy_helper.from_array(np.float32(SCALE), f"{name}_scale"))
    g.inits.append(numpy_helper.from_array(np.zeros((), dtype), f"{name}_zp"))
    q_in = g.last
    if bits < 8:
        qmin, qmax = quant_range(bits, signed)
        g.inits.append(numpy_helper.from_array(np.float32(qmin * SCALE), f"{name}_lo"))
        g.inits.append(numpy_helper.from_array(np.float32(qmax * SCALE), f"{name}_hi"))
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
    g.inits.append(numpy_helper.from_array(values.astype(dtype), f"{name}_quantized"))
    g.inits.append(numpy_helper.from_array(np.full(shape[0], SCALE, np.float32), f"{name}_scale"))
    g.inits.append(numpy_helper.from_array(np.zeros(shape[0], dtype), f"{name}_zp"))
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


def test_qdq_graph_passes_archnet_5op() -> None:
    model = qdq_compliant().model()
    annotations = {"QuantizeLinear", "DequantizeLinear", "Clip"}
    assert annotations <= {n.op_type for n in model.graph.node}
    assert ARCHNET.allowed_ops is not None and not annotations & ARCHNET.allowed_ops
    assert check_model(model, ARCHNET) == []
    assert check_model(model, ARCHNET_INT) == []


@pytest.mark.parametrize("kernel_attr", [True, False])
def test_qdq_conv_kernel_rule_still_applies(
    kernel_attr: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a kernel_shape attribute the kernel is read through DequantizeLinear to the
    integer initializer, even where shape inference gives nothing."""
    g = GraphBuilder()
    qdq_conv(g, "/big/Conv", 8, 8, k=5, act_bits=4, kernel_attr=kernel_attr)
    model = g.model()
    del model.graph.value_info[:]
    monkeypatch.setattr(opset, "_inferred_shapes", lambda model: {})
    v = only(check_model(model, ARCHNET))
    assert (v.node, v.op_type, v.attribute) == ("/big/Conv", "Conv", "kernel_shape=[5, 5]")


def test_clip_that_is_not_a_quantization_annotation_is_an_op() -> None:
    """Only a Clip with constant bounds feeding QuantizeLinear alone narrows a quantized tensor."""
    g = GraphBuilder()
    for name in ("lo", "hi"):
        g.inits.append(numpy_helper.from_array(np.float32(1.0), name))
    clipped = g.add("Clip", "/act/Clip", ["x", "lo", "hi"])  # a ReLU6-like activation
    g.conv("/c/Conv", 8, 8)
    g.add("Clip", "/dyn/Clip", [g.last, "x"])  # computed bound, although it feeds a Q
    q = quantize_input(g, "q")
    g.add("Concat", "/Concat", [clipped, q], axis=1)
    found = [(v.node, v.op_type) for v in check_model(g.model(), ARCHNET)]
    assert found == [("/act/Clip", "Clip"), ("/dyn/Clip", "Clip")]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_bits_from_stored_range(bits: int, signed: bool) -> None:
    """int8 (uint8) storage whose values stay in a b-bit grid is a b-bit weight."""
    g = GraphBuilder()
    x = quantize_input(g, "in")
    lo, hi = quant_range(bits, signed)
    w = int_weight(g, "w", (8, 8, 3, 3), lo, hi, signed)
    g.add("Conv", "/c/Conv", [x, w], kernel_shape=[3, 3])
    weight = next(t for t in quantized_tensors(g.model()) if t.kind == "weight")
    name = "int8" if signed else "uint8"
    assert weight == QuantizedTensor("w_quantized", "weight", bits, name, signed, True, "Conv")


@pytest.mark.parametrize(("below", "above"), [(0, 1), (1, 0)])
def test_weight_bits_one_past_the_grid(below: int, above: int) -> None:
    """One value past a b-bit grid needs b + 1 bits; the grid is the storage type's (signed
    here), so non-negative values in int8 storage need a sign bit more than in uint8."""
    bits = 4
    qmin, qmax = quant_range(bits, signed=True)
    g = GraphBuilder()
    x = quantize_input(g, "in")
    g.add("MatMul", "/m/MatMul", [x, int_weight(g, "w", (16, 4), qmin - below, qmax + above)])
    weight = next(t for t in quantized_tensors(g.model()) if t.kind == "weight")
    assert (weight.bits, weight.consumer) == (bits + 1, "MatMul")
    u = GraphBuilder()
    _, umax = quant_range(bits, signed=False)
    u.add("MatMul", "/m/MatMul", [quantize_input(u, "in"), int_weight(u, "w", (16, 4), 0, umax)])
    weight = next(t for t in quantized_tensors(u.model()) if t.kind == "weight")
    assert (weight.storage, weight.bits) == ("int8", bits + 1)


@pytest.mark.parametrize(("bits", "signed"), [(2, False), (4, False), (3, True), (8, False)])
def test_activation_bits_from_clip(bits: int, signed: bool) -> None:
    g = GraphBuilder()
    x = quantize_input(g, "act", bits, signed)
    g.add("Relu", "/r/Relu", [x])
    model = g.model()
    assert ("Clip" in {n.op_type for n in model.graph.node}) == (bits < 8)
    (act,) = quantized_tensors(model)
    expected = QuantizedTensor(
        "x", "activation", bits, "int8" if signed else "uint8", signed, False, "Relu"
    )
    assert act == expected


def test_quantized_tensors_of_float_graph_is_empty() -> None:
    assert quantized_tensors(compliant().model()) == []


def test_quantized_only_flags_float_compute() -> None:
    target = npu(quantized_only=True)
    model = compliant().model()
    violations = check_model(model, target)
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    assert [v.node for v in violations] == [n.name for n in compute for _ in range(2)]
    first = violations[0]
    assert first.reason == (
        "float compute: input 'x' is not dequantized from an integer tensor "
        "(npu rules.quantized_only = true)"
    )
    assert first.attribute == "input=x"
    assert {n.name for n in float_compute_nodes(model)} == {n.name for n in compute}
    assert check_model(model, npu()) == []  # the same graph is fine for a float chip

    quantized = qdq_compliant().model()
    assert check_model(quantized, target) == []
    assert float_compute_nodes(quantized) == []


def test_quantized_only_names_the_float_operand() -> None:
    """A quantized weight does not make a float input integer, nor does a DequantizeLinear
    over floats (float8 and the like) count as integer."""
    g = GraphBuilder()
    g.add("Conv", "/c/Conv", ["x", int_weight(g, "w", (8, 8, 3, 3))], kernel_shape=[3, 3])
    v = only(check_model(g.model(), npu(quantized_only=True)))
    assert (v.node, v.attribute) == ("/c/Conv", "input=x")

    f = GraphBuilder()
    for name, value in (("s", np.float32(1.0)), ("w8", np.zeros((8, 8, 3, 3), np.float32))):
        f.inits.append(numpy_helper.from_array(value, name))
    f.inits.append(helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    f.nodes.append(helper.make_node("QuantizeLinear", ["w8", "s", "zp"], ["wq"], name="wq"))
    f.nodes.append(helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], name="wd"))
    f.add("Conv", "/f/Conv", [quantize_input(f, "in"), "wd"], kernel_shape=[3, 3])
    model = helper.make_model(
        helper.make_graph(f.nodes, "g", f.inputs, [onnx.ValueInfoProto(name=f.last)], f.inits),
        opset_imports=[helper.make_opsetid("", 19)],
    )
    v = only(check_model(model, npu(quantized_only=True)))
    assert (v.node, v.attribute) == ("/f/Conv", "input=wd")
    weight = next(t for t in quantized_tensors(model) if t.kind == "weight")
    assert (weight.name, weight.storage, weight.bits) == ("w8", "float8e4m3fn", 8)


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


def tiny_quantized_classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    quantize_model(model, QuantConfig(4, 4, (8, 8)))
    calibrate(model, torch.randn(8, 3, 16, 16))
    return model


def saturate_weights(model: nn.Module) -> None:
    """Push one weight per layer past its clamp, as trained LSQ layers do: the stored integers
    then reach the edge of the grid, which is all the graph can show of the bit width."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantModule):
                m.weight.view(-1)[0] = m.weight_quant.step.max() * 2**10


def summary(tensors: list[QuantizedTensor]) -> tuple[set[int], int]:
    return {t.bits for t in tensors}, len(tensors)


def test_real_qdq_export_bits_match_the_export_report() -> None:
    model = tiny_quantized_classifier()
    saturate_weights(model)
    proto = export_qdq(model, (1, 3, 16, 16))
    report, found = qdq_report(proto), quantized_tensors(proto)
    assert len(found) == len(report)
    for t, r in zip(found, report, strict=True):  # one DequantizeLinear per quantizer, in order
        assert (t.kind, t.bits, t.signed, t.per_channel, t.storage) == (
            r["kind"],
            r["bits"],
            r["signed"],
            r["per_channel"],
            r["storage"],
        ), (t, r)
    assert {t.bits for t in found} == {4, 8}
    assert {t.consumer for t in found} == {"Conv", "Gemm"}
    assert check_model(proto, ARCHNET_INT) == [] and float_compute_nodes(proto) == []


def test_real_qdq_export_weight_bits_never_exceed_the_report() -> None:
    """Unsaturated LSQ weights use fewer levels than their grid: the graph shows a narrower
    width for weights, never a wider one; activations are pinned by their Clip or storage."""
    proto = export_qdq(tiny_quantized_classifier(), (1, 3, 16, 16))
    for t, r in zip(quantized_tensors(proto), qdq_report(proto), strict=True):
        assert t.kind == r["kind"]
        assert t.bits <= r["bits"] if t.kind == "weight" else t.bits == r["bits"]


def test_cli_check_prints_quantized_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.out, "width", 200)  # at 80 columns the table shortens names
    model = tiny_quantized_classifier()
    saturate_weights(model)
    path = tmp_path / "q.onnx"
    proto = export_qdq(model, (1, 3, 16, 16), path=path)
    tensors = quantized_tensors(proto)
    assert main(["check", str(path), "--target", "archnet-5op-int"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"0 violation(s) of archnet-5op-int in {len(proto.graph.node)} nodes"
    header = next(line for line in lines if "name" in line and "consumer" in line)
    for col in ("kind", "bits", "storage", "signed", "per-channel"):
        assert col in header
    rows = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    assert [[cell.strip() for cell in row][:4] for row in rows] == [
        [t.name, t.kind, str(t.bits), t.storage] for t in tensors
    ]
    widths = sorted({t.bits for t in tensors}, reverse=True)
    counts = ", ".join(f"{sum(t.bits == b for t in tensors)} at {b} bits" for b in widths)
    assert lines[-1] == f"{len(tensors)} quantized tensors: {counts}; float compute nodes: 0"


def test_cli_check_float_model_on_integer_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "f.onnx"
    model = compliant().model()
    onnx.save_model(model, str(path))
    assert main(["check", str(path), "--target", "archnet-5op-int"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    compute = sum(n.op_type in COMPUTE_OPS for n in model.graph.node)
    assert len(lines) == 2 * compute + 1  # two float operands per node, then the count
    assert all("float compute: input" in line for line in lines[:-1])
    assert "quantized tensors" not in lines[-1]
