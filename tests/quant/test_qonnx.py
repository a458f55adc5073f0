"""QONNX export: one Quant node per quantizer carrying its bit width, computing what PyTorch
computes (checked with qonnx's own executor); bit operations and bits moved by qonnx's
inference-cost analysis, which a width change moves as it must."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from archnet.errors import ArchnetError
from archnet.quant import QuantConfig, prepare_qat
from archnet.quant.qonnx import bit_operations, export_qonnx, qonnx_outputs, write_qonnx

pytest.importorskip("qonnx")

SHAPE = (1, 3, 16, 16)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.SiLU(),  # an unsigned grid with a zero point after it
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    return net.eval()


def _quantized(bits: tuple[int, int]) -> nn.Module:
    x = torch.randn(16, *SHAPE[1:], generator=torch.Generator().manual_seed(1))
    return prepare_qat(copy.deepcopy(_net()), QuantConfig(*bits, None), x).eval()


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (2, 4)])
def test_qonnx_computes_what_pytorch_computes(bits):
    model = _quantized(bits)
    proto = export_qonnx(model, SHAPE)
    quants = [n for n in proto.graph.node if n.op_type == "Quant"]
    # three weights; the input; each conv's output (after its ReLU); the SiLU's sigmoid and
    # product (x * sigmoid(x)); the pool's output, and its grid again after the flatten
    assert len(quants) == 10
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    widths = {int(inits[n.input[3]]) for n in quants}
    assert widths == set(bits)
    x = torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    for i in range(2):
        expected = model(x[i : i + 1]).detach().numpy()
        assert np.abs(qonnx_outputs(proto, x[i : i + 1]) - expected).max() < 1e-5


def test_bit_operations_follow_the_widths():
    float_cost = bit_operations(export_qonnx(_quantized((8, 8)), SHAPE))
    macs = 3 * 8 * 9 * 16 * 16 + 8 * 8 * 9 * 16 * 16 + 8 * 10
    assert float_cost["macs"] == macs and float_cost["bops"] == macs * 8 * 8
    low = bit_operations(export_qonnx(_quantized((2, 4)), SHAPE))
    assert low["bops"] == macs * 2 * 4
    assert low["weight_bits"] * 4 == float_cost["weight_bits"]  # 2 vs 8 bits per weight
    from archnet.onnx_utils import export_onnx

    plain = bit_operations(export_onnx(_net(), SHAPE))
    assert plain["bops"] == macs * 32 * 32  # a float network: every operand 32 bits
    assert plain["uncosted"] == ["GlobalAveragePool"]  # said, not silently zero


def test_write_qonnx_checks_against_pytorch(tmp_path):
    x = torch.randn(3, *SHAPE[1:])
    found = write_qonnx(_quantized((4, 4)), SHAPE, tmp_path / "s.qonnx.onnx", x)
    assert (tmp_path / "s.qonnx.onnx").is_file()
    assert found["quant_nodes"] == 10 and found["max_abs_diff"] <= found["output_step"]
    with pytest.raises(ArchnetError, match="quantized model"):
        export_qonnx(_net(), SHAPE)
