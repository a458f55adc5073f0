"""Transformer-block candidates cut from a timm ViT block: exact where the cut says so."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.candidates import build_candidate, list_candidates
from archnet.onnx_utils import export_onnx, ort_session

torch.set_num_threads(1)
SPEC = BlockSpec("blocks.0", (17, 64), (17, 64), "tokens")
NAMES = list_candidates("tf_*")


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, embed_dim=64, num_heads=4, depth=1, init_values=0.5
    )
    return vit.blocks[0].eval()


def _masked_teacher(teacher: nn.Module, heads: list[int], neurons: list[int]) -> nn.Module:
    """The teacher with every head outside ``heads`` and neuron outside ``neurons`` silenced."""
    masked = copy.deepcopy(teacher)
    dim = masked.attn.head_dim
    with torch.no_grad():
        for h in set(range(masked.attn.num_heads)) - set(heads):
            masked.attn.proj.weight[:, h * dim : (h + 1) * dim] = 0
        for j in set(range(masked.mlp.fc1.out_features)) - set(neurons):
            masked.mlp.fc2.weight[:, j] = 0
    return masked


def test_every_variant_is_built_from_a_vit_block_and_only_from_one():
    teacher = _teacher()
    assert len(NAMES) >= 8
    for name in NAMES:
        assert build_candidate(name, SPEC, teacher) is not None, name
        assert build_candidate(name, SPEC) is None  # nothing to cut from
        assert build_candidate(name, SPEC, nn.Linear(64, 64)) is None


@pytest.mark.parametrize("name", ["tf_heads_half", "tf_ffn_half", "tf_heads_half_ffn_half"])
def test_cut_equals_the_teacher_with_the_dropped_parts_silenced(name):
    teacher = _teacher()
    cut = build_candidate(name, SPEC, teacher).eval()
    x = torch.randn(2, *SPEC.in_shape)
    heads = list(range(4))
    neurons = list(range(teacher.mlp.fc1.out_features))
    if cut.attn.heads < 4:  # which heads were kept: those whose q rows it holds
        q = teacher.attn.qkv.weight[:64].reshape(4, 16, 64)
        heads = [
            h
            for h in range(4)
            if any(torch.equal(q[h], r) for r in cut.attn.qkv.weight[:64].reshape(-1, 16, 64))
        ]
    if cut.mlp.fc1.out_features < len(neurons):
        rows = cut.mlp.fc1.weight
        neurons = [j for j, w in enumerate(teacher.mlp.fc1.weight) if (rows == w).all(1).any()]
    assert len(heads) == cut.attn.heads and len(neurons) == cut.mlp.fc1.out_features
    with torch.no_grad():
        expected = _masked_teacher(teacher, heads, neurons)(x)
        assert torch.allclose(cut(x), expected, atol=1e-5)


def test_heads_and_neurons_are_kept_by_importance():
    teacher = _teacher()
    with torch.no_grad():  # head 2 and the first half of the neurons carry almost nothing
        teacher.attn.proj.weight[:, 32:48] *= 1e-3
        teacher.mlp.fc2.weight[:, :128] *= 1e-3
    cut = build_candidate("tf_heads_half_ffn_half", SPEC, teacher)
    kept_q = cut.attn.qkv.weight[:32].reshape(2, 16, 64)
    dropped = teacher.attn.qkv.weight[32:48]
    assert not any(torch.equal(k, dropped) for k in kept_q)
    assert torch.equal(cut.mlp.fc1.weight, teacher.mlp.fc1.weight[128:])


def test_attention_only_and_ffn_only_halves():
    teacher = _teacher()
    x = torch.randn(2, *SPEC.in_shape)
    with torch.no_grad():
        attn_only = build_candidate("tf_attn_only", SPEC, teacher).eval()(x)
        ffn_only = build_candidate("tf_ffn_only", SPEC, teacher).eval()(x)
        first = x + teacher.ls1(teacher.attn(teacher.norm1(x)))
        assert torch.allclose(attn_only, first, atol=1e-5)
        assert torch.allclose(ffn_only, x + teacher.ls2(teacher.mlp(teacher.norm2(x))), atol=1e-5)
    relu = build_candidate("tf_relu", SPEC, teacher)
    assert isinstance(relu.mlp.act, nn.ReLU) and not any(
        isinstance(m, nn.GELU) for m in relu.modules()
    )


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_matches(name):
    module = build_candidate(name, SPEC, _teacher()).eval()
    x = torch.randn(2, *SPEC.in_shape)
    session = ort_session(export_onnx(module, tuple(x.shape)))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - module(x).numpy()).max() < 1e-4


def test_blocks_the_cut_would_change_are_refused():
    """q/k norms would be dropped by the cut: such a block gets no candidate, not a wrong one."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, embed_dim=64, num_heads=4, depth=1, qk_norm=True
    )
    assert build_candidate("tf_heads_half", SPEC, vit.blocks[0]) is None
