"""Transformer conversions: exact where they say so, and a ViT that passes archnet-transformer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

from archnet.onnx_utils import export_onnx, ort_session
from archnet.opconvert import convert_module, convert_modules
from archnet.quant import QuantConfig, export_qdq, prepare_qat, strip_quantizers
from archnet.targets import check_model, load_target
from archnet.tokenconvert import (
    MatMulAttention,
    OneHotEmbedding,
    TokenBatchNorm,
    TokenPool,
    restrict_block,
)

torch.set_num_threads(1)
REMOVED = {"LayerNormalization", "Gelu", "Erf", "Gather", "ReduceMean"}


def _vit(pool: str = "token", **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return timm.models.vision_transformer.VisionTransformer(
        num_classes=10, global_pool=pool, **{**cfg, **kw}
    ).eval()


def _restricted(vit: nn.Module) -> nn.Module:
    """The ViT on Arch-Net's operators: the shell converted, each block restricted."""
    student = copy.deepcopy(vit)
    convert_modules(student, [f"blocks.{i}" for i in range(len(student.blocks))])
    for block in student.blocks:
        restrict_block(block)
    student.train()
    with torch.no_grad():  # BatchNorm statistics from data, as distillation leaves them
        for _ in range(3):
            student(torch.randn(16, 1, 32, 32))
    return student.eval()


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention_split_into_matmuls_is_exact(qkv_bias):
    attn = _vit(qkv_bias=qkv_bias).blocks[0].attn
    new = convert_module(attn)
    assert isinstance(new, MatMulAttention)
    x = torch.randn(3, 17, 32)
    torch.testing.assert_close(new(x), attn(x), atol=1e-5, rtol=1e-5)


def test_attention_with_qk_norm_is_left_for_the_check():
    assert convert_module(_vit(qk_norm=True).blocks[0].attn) is None


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_token_pool_rewrite_is_exact(pool):
    vit = _vit(pool)
    x = torch.randn(2, 1, 32, 32)
    ref = vit(x)
    rows = convert_modules(vit, [f"blocks.{i}" for i in range(2)])
    assert ("pool", f"global_pool {pool!r}", "TokenPool (MatMul)") in rows
    assert isinstance(vit.fc_norm[0], TokenPool) and vit.global_pool == ""
    # only the pool moved exactly: undo the LayerNorm conversion to compare
    vit.norm = _vit(pool).norm
    if pool == "avg":
        vit.fc_norm[1] = _vit(pool).fc_norm
    torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=1e-5)


def test_layer_norm_becomes_batch_norm_over_the_last_axis():
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.uniform_(-1.0, 1.0)
    bn = convert_module(ln)
    assert isinstance(bn, TokenBatchNorm)
    torch.testing.assert_close(bn.weight, ln.weight)
    for shape in [(4, 8), (4, 5, 8), (4, 3, 5, 8)]:  # vectors, tokens, NHWC
        x = torch.randn(*shape) * 3 + 1
        bn.train()
        y = bn(x)
        flat = y.reshape(-1, 8)  # per channel over everything else: (0, 1), then the affine
        torch.testing.assert_close(
            (flat.mean(0) - ln.bias) / ln.weight, torch.zeros(8), atol=1e-4, rtol=0
        )
        assert y.shape == x.shape
    assert convert_module(nn.LayerNorm((4, 8))) is None


def test_embedding_as_one_hot_times_fully_connected_is_exact():
    emb = nn.Embedding(11, 6)
    new = convert_module(emb)
    assert isinstance(new, OneHotEmbedding)
    ids = torch.randint(0, 11, (3, 7))
    torch.testing.assert_close(new(ids), emb(ids))
    one_hot = nn.functional.one_hot(ids, 11).float()  # what a chip is fed
    torch.testing.assert_close(new(one_hot), emb(ids))
    assert convert_module(nn.Embedding(11, 6, max_norm=1.0)) is None


def test_layer_scale_is_folded_exactly():
    torch.manual_seed(0)
    identity = lambda dim, **kw: nn.Identity()  # noqa: E731  (isolates the fold from the norms)
    block = timm.models.vision_transformer.Block(
        32, 2, mlp_ratio=2.0, init_values=0.5, norm_layer=identity, act_layer=nn.ReLU
    ).eval()
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.2, 2.0)
        block.ls2.gamma.uniform_(0.2, 2.0)
    x = torch.randn(2, 9, 32)
    ref = block(x)
    restricted = restrict_block(copy.deepcopy(block))
    assert isinstance(restricted.ls1, nn.Identity) and isinstance(restricted.ls2, nn.Identity)
    torch.testing.assert_close(restricted(x), ref, atol=1e-5, rtol=1e-5)


def test_restricted_vit_passes_archnet_transformer_and_the_teacher_does_not():
    target = load_target("archnet-transformer")
    vit = _vit()
    teacher_proto = export_onnx(vit, (1, 1, 32, 32))
    found = {v.op_type for v in check_model(teacher_proto, target)}
    assert {"LayerNormalization", "Conv"} <= found  # the 8x8 stride-8 patch conv, the norms

    student = _restricted(vit)
    proto = export_onnx(student, (1, 1, 32, 32))
    assert check_model(proto, target) == []
    assert not REMOVED & {n.op_type for n in proto.graph.node}
    # the class token broadcast is a constant of the fixed-shape graph, and the graph runs
    x = torch.randn(1, 1, 32, 32)
    (out,) = ort_session(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(out, student(x).detach().numpy(), atol=1e-4, rtol=1e-4)
    assert check_model(proto, load_target("archnet-5op"))  # MatMul, Softmax, Add: not in 5op


def test_quantized_restricted_vit_quantizes_the_attention_matmuls():
    target = load_target("archnet-transformer")
    student = _restricted(_vit())
    calibration = torch.randn(32, 1, 32, 32)
    student = prepare_qat(student, QuantConfig(4, 4, (8, 8)), calibration)
    attn = student.blocks[0].attn
    assert set(attn.quant) == {"q", "k", "v", "probs"}
    assert not attn.quant["probs"].signed  # probabilities are never negative
    proto = export_qdq(student, (1, 1, 32, 32))
    assert check_model(proto, target) == []
    # four quantized matmul inputs per block: two QuantizeLinear feed each attention MatMul
    ops = {n.output[0]: n.op_type for n in proto.graph.node}
    fed = [
        n
        for n in proto.graph.node
        if n.op_type == "MatMul" and "/attn/" in n.name and n.name.count("MatMul") == 1
    ]
    quantized = [n for n in fed if all(ops.get(i) == "DequantizeLinear" for i in n.input)]
    assert len(quantized) >= 2 * len(student.blocks), [n.name for n in fed]
    x = calibration[:1]
    (out,) = ort_session(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(out, student(x).detach().numpy(), atol=5e-2, rtol=0)
    strip_quantizers(student)
    assert attn.quant is None


def test_hant_attention_is_made_explicit_for_quantization():
    block = _vit().blocks[0]
    x = torch.randn(4, 17, 32)
    ref = block(x)
    quantized = copy.deepcopy(block)
    quantized = prepare_qat(quantized, QuantConfig(8, 8, None), x)
    assert isinstance(quantized.attn, MatMulAttention) and quantized.attn.quant is not None
    assert (quantized(x) - ref).abs().max() < 0.1 * ref.abs().max()


def test_masked_and_causal_attention_stay_exact():
    attn = _vit().blocks[0].attn
    new = convert_module(attn)
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(
        new(x, is_causal=True), attn(x, is_causal=True), atol=1e-5, rtol=1e-5
    )
    mask = torch.rand(17, 17) > 0.3
    mask.fill_diagonal_(True)
    torch.testing.assert_close(
        new(x, attn_mask=mask), attn(x, attn_mask=mask), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vits_convert_to_archnet_transformer(name):
    """The 16x16 stride-16 patch embedding becomes four stride-2 3x3 convs; nothing is left."""
    torch.manual_seed(0)
    vit = timm.create_model(name, img_size=64, depth=2).eval()
    student = copy.deepcopy(vit)
    rows = convert_modules(student, ["blocks.0", "blocks.1"])
    assert ("patch_embed.proj", "Conv2d 16x16 s16", " + ".join(["Conv2d 3x3 s2"] * 4)) in rows
    for block in student.blocks:
        restrict_block(block)
    proto = export_onnx(student.eval(), (1, 3, 64, 64))
    assert check_model(proto, load_target("archnet-transformer")) == []
    x = torch.randn(1, 3, 64, 64)  # the patch embedding alone is exact
    torch.testing.assert_close(student.patch_embed(x), vit.patch_embed(x), atol=1e-4, rtol=1e-4)
