"""Attribute rules per op type: every broken rule is reported once with the offending value,
and a rule whose value the graph does not show is unverified, never passed."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from archnet.targets import Target, check_model, check_report, load_target
from archnet.targets.rules import _GROUPS
from archnet.targets.target import CONV_GROUPS, Rules
from tests.targets.graphs import ARCHNET, GraphBuilder, computed_weight_conv, npu, only

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


# --- values the graph does not show ---------------------------------------------------------------


def test_unknown_kernel_is_unverified() -> None:
    report = check_report(computed_weight_conv().raw(), ARCHNET)
    assert report.violations == ()
    (u,) = report.unverified
    assert (u.node, u.op_type, u.rule, u.module) == ("/c/Conv", "Conv", "conv_kernel_shapes", "c")
    assert u.reason.startswith("kernel_shape unknown: no kernel_shape attribute and the shape of")
    assert "'/w/Reshape_out'" in u.reason and "rules.conv_kernel_shapes = [[3, 3]]" in u.reason
    assert not report.passed() and report.passed(allow_unverified=True)
    # the kernel attribute alone verifies every rule of archnet-5op
    assert check_report(computed_weight_conv(kernel_attr=True).raw(), ARCHNET).passed()


def test_unknown_channels_are_unverified_where_a_rule_needs_them() -> None:
    """max_channels needs both sizes; depthwise groups need the input channels; dense groups
    and open rules need neither."""
    capped = check_report(computed_weight_conv(kernel_attr=True).raw(), npu())
    assert [(u.rule, u.reason.split(":")[0]) for u in capped.unverified] == [
        ("max_channels", "out_channels unknown")  # the input's 8 channels are known
    ]
    g = computed_weight_conv(kernel_attr=True, group=2)
    g.inputs[0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)  # any shape
    grouped = g.raw()
    depthwise = check_report(grouped, npu(conv_groups="depthwise", max_channels=None))
    assert [u.rule for u in depthwise.unverified] == ["conv_groups"]
    assert [v.attribute for v in check_report(grouped, ARCHNET).violations] == ["group=2"]


def test_failed_shape_inference_is_named_in_the_unverified_reason() -> None:
    """B of a MatMul is a run-time tensor, A comes from a MatMul that shape inference rejects:
    neither size of the second MatMul can be read."""
    g = GraphBuilder(channels=8, size=1)
    g.add("Flatten", "/Flatten", axis=1)
    g.add("MatMul", "/bad/MatMul", [g.last, g.const("a", np.zeros((5, 3), np.float32))])
    g.inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, None))
    g.add("MatMul", "/attn/MatMul", [g.last, "b"])
    report = check_report(g.raw(), npu(frozenset({"MatMul"})))
    found = [(u.node, u.rule) for u in report.unverified]
    assert found == [("/attn/MatMul", "max_channels")] * 2
    assert all("shape inference failed" in u.reason for u in report.unverified)
    assert report.violations == ()  # the first MatMul's sizes come from its initializer


# ----------------------------------------------------------------------------- Transformer rules
TRANSFORMER = load_target("archnet-transformer")


def _attention_graph(softmax_axis: int | None, extra_rank: bool = False) -> onnx.ModelProto:
    """x (1, 8, 16, 16) read as (batch, heads, tokens, dim): scores, softmax, values."""
    g = GraphBuilder()
    x = g.last
    if extra_rank:
        x = g.add("Reshape", "split", [x, g.const("shape", np.array([1, 2, 4, 16, 16]))])
    kt = g.add("Transpose", "kt", [x], perm=[0, 1, 3, 2] if not extra_rank else [0, 1, 2, 4, 3])
    scores = g.add("MatMul", "/attn/MatMul", [x, kt])
    attrs = {} if softmax_axis is None else {"axis": softmax_axis}
    probs = g.add("Softmax", "/attn/Softmax", [scores], **attrs)
    g.add("MatMul", "/attn/MatMul_1", [probs, x])
    return g.model()


@pytest.mark.parametrize("axis", [None, -1, 3])
def test_softmax_over_the_last_axis_passes(axis) -> None:
    assert check_model(_attention_graph(axis), TRANSFORMER) == []


def test_softmax_over_another_axis_is_a_violation() -> None:
    v = only(check_model(_attention_graph(1), TRANSFORMER))
    assert (v.op_type, v.attribute) == ("Softmax", "axis=1")
    assert "rules.softmax_last_axis" in v.reason


def test_matmul_above_the_rank_limit_is_a_violation() -> None:
    found = check_model(_attention_graph(-1, extra_rank=True), TRANSFORMER)
    assert {v.op_type for v in found} == {"MatMul"}
    assert all(v.attribute == "rank=5" and "matmul_max_rank" in v.reason for v in found)


def test_transformer_ops_are_violations_on_the_five_operator_target() -> None:
    ops = {v.op_type for v in check_model(_attention_graph(-1), ARCHNET)}
    assert ops == {"Transpose", "MatMul", "Softmax"}
