from __future__ import annotations

import torch
from torch import nn

from archnet.flops import count_macs, count_params


def test_conv_macs_exact():
    conv = nn.Conv2d(3, 8, 3, stride=1, padding=1)
    assert count_macs(conv, (3, 16, 16)) == 8 * 16 * 16 * 3 * 3 * 3


def test_strided_grouped_and_depthwise_conv_macs():
    grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4, bias=False)
    assert count_macs(grouped, (8, 10, 10)) == 16 * 5 * 5 * (8 // 4) * 9
    depthwise = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
    assert count_macs(depthwise, (8, 6, 6)) == 8 * 6 * 6 * 25


def test_linear_and_sequential_macs():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 10),
    )
    assert count_macs(model, (3, 5, 5)) == 4 * 5 * 5 * 3 + 100 * 10


def test_count_params():
    assert count_params(nn.Conv2d(3, 8, 3)) == 8 * 3 * 9 + 8
    assert count_params(nn.BatchNorm2d(5)) == 10
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, shared)) == 20


def test_count_macs_leaves_training_state_and_bn_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model[1].eval()
    stats = model[1].running_mean.clone()
    count_macs(model, (3, 8, 8))
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)
    assert not model[0]._forward_hooks


def test_attention_matmuls_are_counted_fused_or_not():
    """An encoder layer: its four linear layers (12 tokens: 9216 + 3072 + 6144 + 6144 MACs)
    plus QK^T and the weighted sum of values (2 x 12 x 12 x 16), whichever kernel runs."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    assert count_macs(layer, (12, 16)) == 24576 + 2 * 12 * 12 * 16
    assert layer.training is False


def test_vit_attention_counts_the_same_through_sdpa_and_explicit_matmuls():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2)
    counts = []
    for fused in (True, False):
        for block in model.blocks:
            block.attn.fused_attn = fused
        counts.append(count_macs(model, (3, 32, 32)))
    assert counts[0] == counts[1]
    tokens, width = 5, 192  # 2x2 patches and the class token
    patch_embed = 4 * width * 3 * 16 * 16
    per_block = tokens * width * (3 * width + width + 4 * width + 4 * width)
    attention = 2 * tokens * tokens * width
    assert counts[0] == patch_embed + 2 * (per_block + attention) + width * 10
