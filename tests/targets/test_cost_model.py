"""The bitops cost model: estimates labelled as such, exact sums over parts, widths that move
the estimate as bit operations say, and target files that must state the throughputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archnet.errors import ArchnetError
from archnet.quant import QuantConfig, calibrate, quantize_model
from archnet.targets import get_backend, load_target

pytest.importorskip("qonnx")

SHAPE = (1, 8, 16, 16)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU()
    ).eval()


def test_integer_target_is_estimated_and_additive():
    target = load_target("archnet-5op-int")
    backend = target.latency_backend()
    assert target.estimated and backend.estimated and not load_target("cpu-ort").estimated
    assert "bitops cost model" in backend.cache_key().runtime
    net = _net()
    shape_mid = (1, 16, 16, 16)
    t = backend.measure_interleaved(
        {"whole": (net, SHAPE), "first": (net[:2], SHAPE), "second": (net[2:], shape_mid)}
    )
    assert t["whole"] == pytest.approx(t["first"] + t["second"], rel=1e-12)
    macs = 8 * 16 * 9 * 256 + 16 * 8 * 9 * 256
    moved = (8 * 16 * 9 + 16 * 8 * 9) * 32 + (16 + 8) * 256 * 32  # float weights and outputs
    expected = macs * 32 * 32 / backend.bops_per_ms + moved / backend.bits_per_ms
    assert t["whole"] == pytest.approx(expected, rel=1e-9)
    assert backend.overhead_ms(SHAPE) == 0.0  # an identity costs nothing: parts add up


def test_lower_widths_cost_less():
    backend = load_target("archnet-5op-int").latency_backend()
    costs = {}
    for bits in ((8, 8), (4, 4), (2, 4)):
        q = _net()
        quantize_model(q, QuantConfig(*bits, None))  # first and last layer too
        calibrate(q, torch.randn(4, *SHAPE[1:]))
        costs[bits] = backend.measure(q.eval(), SHAPE)
    float_ms = backend.measure(_net(), SHAPE)
    assert float_ms > costs[(8, 8)] > costs[(4, 4)] > costs[(2, 4)] > 0


def test_cost_settings_are_checked(tmp_path):
    def target(text: str):
        path = tmp_path / "t.toml"
        path.write_text('name = "t"\n' + text)
        return load_target(path)

    with pytest.raises(ArchnetError, match="bops_per_ms and bits_per_ms"):
        target('[latency]\nbackend = "bitops"\n').latency_backend()
    with pytest.raises(ArchnetError, match="cost model"):
        target('[latency]\nbackend = "onnxruntime"\n[cost]\nbops_per_ms = 1.0\n').latency_backend()
    with pytest.raises(ArchnetError, match="unknown key cost.flops"):
        target('[latency]\nbackend = "bitops"\n[cost]\nflops = 1.0\n')
    with pytest.raises(ArchnetError, match="positive numbers"):
        target('[latency]\nbackend = "bitops"\n[cost]\nbops_per_ms = -1\n')
    ok = target('[latency]\nbackend = "bitops"\n[cost]\nbops_per_ms = 1e9\nbits_per_ms = 1e6\n')
    assert ok.to_dict()["cost"] == {"bits_per_ms": 1e6, "bops_per_ms": 1e9}
    assert get_backend("bitops", bops_per_ms=1e9, bits_per_ms=1e6).bops_per_ms == 1e9
