"""Integer quantization points: every tensor quantized once where it is produced, so that
onnxruntime runs every convolution and residual add as an integer kernel, and the graph as
written computes what the training graph computes."""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from archnet.quant import QuantConfig, export_qdq, prepare_qat, strip_quantizers
from archnet.quant.integer import OnGrid, RequantPoint, integer_points, share_quantizers
from archnet.quant.lsq import LSQQuantizer

SHAPE = (1, 3, 16, 16)


class Residual(nn.Module):
    """conv-bn-relu, conv-bn, plus the input, relu: a ResNet basic block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.blocks = nn.Sequential(Residual(8), Residual(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.blocks(self.pool(self.stem(x))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # batch norms with statistics of their own, as after training
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _calibration() -> torch.Tensor:
    return torch.randn(16, *SHAPE[1:], generator=torch.Generator().manual_seed(1))


def _optimized_ops(proto: onnx.ModelProto, tmp_path) -> collections.Counter:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(
        n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node
    )


@pytest.mark.parametrize("requantize", [True, False])
def test_onnxruntime_runs_every_conv_and_add_as_integer_kernels(requantize, tmp_path):
    cfg = QuantConfig(8, 8, (8, 8), requantize=requantize)
    model = prepare_qat(copy.deepcopy(_net()), cfg, _calibration()).eval()
    ops = _optimized_ops(export_qdq(model, SHAPE), tmp_path)
    if requantize:
        assert ops["QLinearConv"] == 5 and "Conv" not in ops, ops
        assert ops["QLinearAdd"] == 2 and "Add" not in ops, ops
    else:  # inputs alone: float convolutions behind DequantizeLinear, float adds
        assert ops["QLinearConv"] < 5 and ops["Add"] == 2, ops


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_the_graph_as_written_computes_what_pytorch_computes(bits):
    model = prepare_qat(copy.deepcopy(_net()), QuantConfig(*bits, (8, 8)), _calibration()).eval()
    proto = export_qdq(model, SHAPE)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    x = torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    for i in range(4):
        expected = model(x[i : i + 1]).detach().numpy()
        (got,) = session.run(None, {"input": x[i : i + 1].numpy()})
        step = model.get_submodule("head.2").weight_quant.step.max().item()  # a coarse bound
        assert np.abs(got - expected).max() <= step


def test_each_tensor_is_quantized_once():
    model = prepare_qat(copy.deepcopy(_net()), QuantConfig(8, 8, (8, 8)), _calibration())
    points = [m for m in model.modules() if isinstance(m, RequantPoint)]
    # the input; the stem's output; per block its first conv's output, its second conv's
    # output (an add input) and the add's; the average pool. The max-pool keeps its grid
    assert len(points) == 9
    conv = model.get_submodule("blocks.0.conv1")
    assert conv.act_quant.grid is model.get_submodule("requant_1")  # the stem output grid
    proto = export_qdq(model.eval(), SHAPE)
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len({n.input[0] for n in qs}) == len(qs)  # no tensor quantized twice


def test_points_are_added_once():
    model = prepare_qat(copy.deepcopy(_net()), QuantConfig(8, 8, (8, 8)), _calibration())
    before = sum(isinstance(m, RequantPoint) for m in model.modules())
    again = integer_points(model, _calibration()[:2], 8)
    assert sum(isinstance(m, RequantPoint) for m in again.modules()) == before


class _Untraceable(nn.Module):
    """A forward with data-dependent control flow, which FX cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Residual(8)

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.stem(x)
        return self.block(x)


def test_a_module_that_does_not_trace_is_handled_child_by_child():
    torch.manual_seed(0)
    model = prepare_qat(_Untraceable().eval(), QuantConfig(8, 8, None), _calibration())
    assert type(model) is _Untraceable  # the root kept, its traceable child rewritten
    assert sum(isinstance(m, RequantPoint) for m in model.block.modules()) >= 3
    x = _calibration()[:2]
    assert torch.isfinite(model(x)).all()


def test_blocks_quantized_apart_share_their_boundary_grid():
    torch.manual_seed(0)
    x = torch.randn(8, 8, 8, 8)
    first = prepare_qat(Residual(8).eval(), QuantConfig(4, 4, None), x, quantize_output=True)
    second = prepare_qat(Residual(8).eval(), QuantConfig(4, 4, None), x, quantize_output=True)
    model = nn.Sequential(first, second)
    out = first(x)
    assert share_quantizers(model, x) == 1
    # the second block reads the first one's output as it is, on the first one's grid
    entry = second.get_submodule("requant_0")
    assert isinstance(entry, OnGrid) and torch.equal(entry(out), out)
    assert entry.grid is [m for m in first.modules() if isinstance(m, LSQQuantizer)][-1]
    # every layer reading a grid reads a quantizer the model holds (steps train, export sees it)
    held = {id(m) for m in model.modules()}
    assert all(id(m.grid) in held for m in model.modules() if isinstance(m, OnGrid))
    assert export_qdq(model.eval(), (1, 8, 8, 8), exporter="torchscript/opset17")
    model[0] = nn.Identity()  # the first block stubbed, as the latency model times the rest
    assert export_qdq(model.eval(), (1, 8, 8, 8), exporter="torchscript/opset17")


def test_the_float_twin_drops_every_point():
    float_net = _net()
    model = prepare_qat(copy.deepcopy(float_net), QuantConfig(8, 8, (8, 8)), _calibration())
    twin = strip_quantizers(model).eval()
    assert not any(isinstance(m, LSQQuantizer) for m in twin.modules())
    x = _calibration()[:4]
    torch.testing.assert_close(twin(x), float_net(x), atol=1e-5, rtol=1e-4)  # BN folded


class _InPlaceSiLU(nn.Module):
    """conv, an in-place SiLU, conv: the SiLU keeps the tensor's identity, not its grid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def test_silu_runs_as_integer_sigmoid_and_product(tmp_path):
    torch.manual_seed(0)
    cfg = QuantConfig(8, 8, None)
    model = prepare_qat(_InPlaceSiLU().eval(), cfg, _calibration(), quantize_output=True)
    ops = _optimized_ops(export_qdq(model.eval(), SHAPE), tmp_path)
    # the SiLU as x * sigmoid(x), each requantized: every op an integer kernel
    assert ops["QLinearConv"] == 2 and ops["QLinearSigmoid"] == 1 and ops["QLinearMul"] == 1
    assert not {"Conv", "Mul", "Sigmoid"} & set(ops), ops


def test_share_quantizers_skips_a_tensor_changed_in_place():
    q1, q2 = LSQQuantizer(8), LSQQuantizer(8)
    model = nn.Sequential(q1, nn.SiLU(inplace=True), q2)
    x = torch.randn(4, 8)
    model(x)  # steps set
    assert share_quantizers(model, x) == 0  # the SiLU changed q1's output in place
    assert share_quantizers(nn.Sequential(q1, q2), x) == 1


class _Scaled(nn.Module):
    """A conv times a learned per-channel scale (a parameter, not an activation)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        return self.conv(x) * self.scale


def test_a_parameter_operand_is_not_quantized_as_an_activation():
    torch.manual_seed(0)
    model = prepare_qat(_Scaled().eval(), QuantConfig(8, 8, None), _calibration())
    readers = {n.args[0].op for n in model.graph.nodes if isinstance(_of(model, n), RequantPoint)}
    assert "get_attr" not in readers


def _of(model, node):
    return model.get_submodule(node.target) if node.op == "call_module" else None
