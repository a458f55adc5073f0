"""Targets that cap channels: wide layers become exact parallel slices joined by Concat."""

import torch
from torch import nn

from archnet.channelsplit import ChannelSplit, split_wide_layers
from archnet.onnx_utils import export_onnx
from archnet.targets import Rules, check_model, load_target


def test_split_is_exact_and_passes_the_channel_cap():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 40, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(40 * 16, 20)
    ).eval()
    x = torch.randn(2, 8, 4, 4)
    before = model(x)
    wide = export_onnx(model[:2], (1, 8, 4, 4))
    rows = split_wide_layers(model, max_channels=16)
    assert [r[0] for r in rows] == ["0", "3"]
    assert isinstance(model[0], ChannelSplit) and len(model[0].parts) == 3  # 16 + 16 + 8
    assert torch.allclose(model(x), before, atol=1e-6)
    base = load_target("archnet-5op")
    capped = base.__class__(
        **{**base.__dict__, "rules": Rules(**{**base.rules.__dict__, "max_channels": 16})}
    )

    def channel_violations(proto):
        return [v for v in check_model(proto, capped) if "max_channels" in v.reason]

    assert channel_violations(wide)  # the unsplit conv breaks the cap ...
    assert not channel_violations(export_onnx(model[:2], (1, 8, 4, 4)))  # ... the split one not


def test_narrow_and_grouped_layers_are_left_alone():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(32, 32, 3, groups=32))
    assert split_wide_layers(model, max_channels=16) == []


def test_a_root_layer_is_not_reported_as_split():
    conv = nn.Conv2d(3, 40, 3)
    assert split_wide_layers(conv, max_channels=16) == []
    assert conv.out_channels == 40
