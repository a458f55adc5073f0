"""Model-level API: bit specs, layer swapping, BN folding, size accounting, QAT smoke test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archnet.quant import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    calibrate,
    fold_bn,
    is_quantized,
    model_size_bits,
    parse_bits,
    quantize_model,
    strip_quantizers,
)
from archnet.zoo import create_model


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial statistics so folding is actually exercised."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.mark.parametrize(("text", "bits"), [("w4a4", (4, 4)), ("W2A4", (2, 4)), ("w8a8", (8, 8))])
def test_parse_bits(text: str, bits: tuple[int, int]) -> None:
    assert parse_bits(text) == bits


@pytest.mark.parametrize("text", ["w4", "4a4", "w1a4", "w4a9", "w4a4x", ""])
def test_parse_bits_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bit-width spec"):
        parse_bits(text)


def test_quantize_model_swaps_and_keeps_edges_at_8_bits() -> None:
    model = create_model("tiny_resnet")
    names = quantize_model(model, QuantConfig(weight_bits=2, act_bits=4))
    assert names[0] == "conv1" and names[-1] == "fc"
    assert "layer2.0.downsample.0" in names and len(names) == 16
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert (model.conv1.weight_bits, model.conv1.act_bits) == (8, 8)
    assert (model.fc.weight_bits, model.fc.act_bits) == (8, 8)
    inner = model.get_submodule("layer1.0.conv1")
    assert (inner.weight_bits, inner.act_bits) == (2, 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_quantize_model_filter_and_no_edges() -> None:
    model = create_model("tiny_resnet")
    names = quantize_model(
        model, QuantConfig(first_last=None), filter_fn=lambda m, name: name.startswith("layer3")
    )
    assert names and all(n.startswith("layer3") for n in names)
    assert type(model.conv1) is nn.Conv2d
    assert model.get_submodule(names[0]).weight_bits == 4


def test_unsigned_after_relu_in_sequential() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    quantize_model(model, QuantConfig(first_last=None))
    assert model[0].act_quant.signed and not model[2].act_quant.signed


def test_from_float_keeps_weights() -> None:
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    q = QuantConv2d.from_float(conv, 8, 8)
    assert torch.equal(q.weight, conv.weight) and torch.equal(q.bias, conv.bias)
    assert q.stride == (2, 2) and q.padding == (1, 1)


def test_fold_bn_is_exact() -> None:
    torch.manual_seed(0)
    model = create_model("tiny_resnet").eval()
    seq = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)).eval()
    _randomise_bn(model)
    _randomise_bn(seq)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, ref_seq = model(x), seq(x)
        fold_bn(model)
        fold_bn(seq)
        assert (model(x) - ref).abs().max() < 1e-5
        assert (seq(x) - ref_seq).abs().max() < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(seq[1], nn.Identity)


def test_model_size_bits() -> None:
    layer = QuantLinear(10, 5, weight_bits=4, act_bits=8)
    # weight 50 x 4 bits; bias 5, weight steps 5 and activation step 1 at 32 bits
    assert model_size_bits(layer) == 50 * 4 + (5 + 5 + 1) * 32
    assert model_size_bits(nn.Linear(10, 5)) == 55 * 32


def test_quantized_training_lowers_loss() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    quantize_model(student, QuantConfig(weight_bits=2, act_bits=4, first_last=None))
    x = torch.randn(256, 8)
    with torch.no_grad():
        target = teacher(x)
        student(x)  # initialises the steps before the optimiser sees them
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(student(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


class _StemHead(nn.Module):
    """timm naming: ``conv_stem`` feeds ``bn1``, which names alone do not reveal."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv_head = nn.Conv2d(8, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(torch.relu(self.bn1(self.conv_stem(x)))))


def test_traced_fold_finds_pairs_names_miss_and_is_exact() -> None:
    model = _StemHead().eval()
    _randomise_bn(model)
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    fold_bn(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class _Shared(nn.Module):
    """The conv's output is used twice: folding its batch norm would change the other use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_traced_fold_refuses_a_change_of_output() -> None:
    model = _Shared().eval()
    _randomise_bn(model)
    with pytest.raises(ValueError, match="changed the output"):
        fold_bn(model, torch.randn(2, 3, 8, 8))


def test_fold_timm_batchnorm_act_keeps_its_activation() -> None:
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU))
    _randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    fold_bn(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_strip_quantizers_restores_float_layers() -> None:
    model = create_model("tiny_resnet", num_classes=10).eval()
    quantize_model(model, QuantConfig(4, 4))
    calibrate(model, torch.randn(4, 3, 32, 32))
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("weight")}
    assert is_quantized(model)
    strip_quantizers(model)
    assert not is_quantized(model)
    after = dict(model.named_parameters())
    for name, w in weights.items():
        torch.testing.assert_close(after[name], w)


def test_quantize_model_keeps_quantized_layers_and_counts_them_as_edges() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.randn(1, 3, 8, 8))
    model[0] = QuantConv2d.from_float(model[0], 2, 2)
    quantize_model(model, QuantConfig(4, 4, (8, 8)))
    assert model[0].weight_bits == 2  # already quantized: kept, though it is the first layer
    assert model[2].weight_bits == 4  # not promoted to the first layer
    assert model[4].weight_bits == 8


def test_fold_check_ignores_rounding_flips_in_quantized_layers_downstream() -> None:
    """Folding is exact in float; a quantized layer after it must not turn float rounding
    into whole-step flips that look like a wrong fold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    _randomise_bn(model)
    model.append(QuantConv2d.from_float(nn.Conv2d(8, 8, 3), 2, 2)).eval()
    x = torch.randn(64, 3, 8, 8)
    calibrate(model, x)
    before = model(x)
    fold_bn(model, x, atol=1e-6)
    assert isinstance(model[1], nn.Identity)
    # with quantizers on, a few values may sit on a rounding boundary: at most one step apart
    step = (
        model[3].act_quant.step
        * model[3].weight_quant(model[3].weight).abs().flatten(1).sum(1).max()
    )
    assert (model(x) - before).abs().max() <= step
