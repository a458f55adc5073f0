"""Reading ONNX graphs: source modules from both exporters, shapes read through the nodes a
compiler removes, and the reason a shape is unknown."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from archnet.targets.graph import Graph, module_of
from tests.targets.graphs import GraphBuilder, int_weight


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


def test_removed_nodes_are_aliases_and_constant_subgraphs() -> None:
    g = GraphBuilder()
    g.weight("shared", (8, 8, 3, 3))
    g.nodes.append(helper.make_node("Identity", ["shared"], ["w2"], name="Identity_0"))
    g.nodes.append(helper.make_node("Constant", [], ["one"], name="Constant_0", value_float=1.0))
    g.add("Mul", "/folded/Mul", ["one", "one"])  # constants only: folded at compile time
    g.add("Conv", "/c/Conv", ["x", "w2"], pads=[1, 1, 1, 1])
    g.add("Identity", "/skip/Identity")  # a block that returns its input
    graph = Graph(g.model())
    assert [n.name for n in graph.kept_nodes()] == ["/c/Conv"]
    assert graph.resolve("/skip/Identity_out") == "/c/Conv_out"
    assert graph.shape("w2") == (8, 8, 3, 3)  # through the Identity


def test_weight_shape_read_through_dequantize_without_inference() -> None:
    """An integer initializer behind DequantizeLinear gives the kernel shape even where shape
    inference can tell nothing (its dims are read before inference runs)."""
    g = GraphBuilder()
    w = int_weight(g, "w", (4, 8, 5, 5))
    g.add("Frob", "/f/Frob", [w], domain="acme")  # shape inference knows nothing of it
    model = g.raw()
    model.opset_import.append(helper.make_opsetid("acme", 1))
    graph = Graph(model)
    assert graph.shape(w) == (4, 8, 5, 5)
    assert graph.shape("/f/Frob_out") is None
    assert graph.why_unknown("/f/Frob_out") == (
        "the shape of '/f/Frob_out' is unknown (shape inference cannot tell)"
    )


def test_failed_inference_is_named() -> None:
    g = GraphBuilder(channels=8, size=1)
    g.add("Flatten", "/Flatten", axis=1)
    g.add("MatMul", "/bad/MatMul", [g.last, g.const("a", np.zeros((5, 3), np.float32))])
    graph = Graph(g.raw())
    assert graph.shape("/bad/MatMul_out") is None
    reason = graph.why_unknown("/bad/MatMul_out")
    assert reason.startswith("the shape of '/bad/MatMul_out' is unknown (shape inference failed: ")
    assert "Incompatible dimensions" in reason


def test_constants_and_element_types() -> None:
    g = GraphBuilder()
    g.nodes.append(helper.make_node("Constant", [], ["c"], value_float=2.0))
    g.add("Relu", "/r/Relu")
    graph = Graph(g.model())
    assert graph.array("c") == np.float32(2.0)
    assert graph.array("x") is None  # computed at run time
    assert graph.elem_type("c") == TensorProto.FLOAT
    assert graph.elem_type("/r/Relu_out") == TensorProto.FLOAT
