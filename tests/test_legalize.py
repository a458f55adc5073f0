"""Exact shell rewrites: each computes what the layer it replaces computed (random inputs,
trained-looking batch norms), and exports the operators the target runs."""

from __future__ import annotations

import collections

import pytest
import timm
import torch
from torch import nn

from archnet.distill.finetune import out_of_place
from archnet.legalize import reparameterized, with_zero_bias
from archnet.onnx_utils import export_onnx
from archnet.opconvert import convert_module


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _ops(module: nn.Module, shape) -> collections.Counter:
    return collections.Counter(n.op_type for n in export_onnx(module, shape).graph.node)


def test_repvgg_stem_folds_into_one_conv_exactly():
    torch.manual_seed(0)
    stem = _randomize_bn(timm.create_model("repvgg_a0", pretrained=False).stem)
    x = torch.randn(2, 3, 32, 32)
    folded = convert_module(stem)
    assert folded is not None and reparameterized(nn.ReLU()) is None  # only what folds
    torch.testing.assert_close(folded(x), stem(x), rtol=1e-4, atol=1e-5)
    assert "Add" in _ops(stem, (1, 3, 32, 32)) and "Add" not in _ops(folded, (1, 3, 32, 32))
    assert _ops(folded, (1, 3, 32, 32))["Conv"] == 1


def test_bias_free_linear_exports_as_gemm_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(16, 4, bias=False)
    x = torch.randn(3, 16)
    new = convert_module(linear)
    torch.testing.assert_close(new(x), linear(x))
    assert "MatMul" in _ops(linear, (1, 16)) and set(_ops(new, (1, 16))) == {"Gemm"}
    assert with_zero_bias(nn.Linear(16, 4)) is None  # with a bias it is a Gemm already


def test_csp_stage_split_becomes_one_hot_convs_exactly():
    from archnet.legalize import SplitFreeCrossStage, split_free_cross_stage

    torch.manual_seed(0)
    stage = _randomize_bn(timm.create_model("cspresnet50", pretrained=False).stages[1])
    x = torch.randn(2, 128, 16, 16)
    before = stage(x)
    rows = split_free_cross_stage(stage)
    assert type(stage) is SplitFreeCrossStage and rows and rows[0][0] == ""
    torch.testing.assert_close(stage(x), before, rtol=0, atol=0)  # one-hot taps: bit-exact
    assert "Split" not in _ops(stage, (1, 128, 16, 16))
    assert not any(p.requires_grad for p in stage.pick_cross.parameters())  # they select
    assert split_free_cross_stage(nn.Identity()) == []


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.SiLU])
def test_out_of_place_keeps_values(act):
    model = nn.Sequential(nn.Linear(4, 4), act(inplace=True))
    x = torch.randn(2, 4)
    before = model(x)
    out_of_place(model)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    torch.testing.assert_close(model(x), before)
