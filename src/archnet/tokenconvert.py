"""Arch-Net conversion of Transformer layers: what a chip without LayerNorm, GELU or gathers runs.

Arch-Net's Transformer student keeps softmax, the attention matmuls and the residual adds, and
replaces everything a plain NPU lacks. This module holds those replacements (registered with
:mod:`archnet.opconvert`, so the same walk converts CNN and Transformer layers):

=====================================  =====================================================
teacher layer                          replacement
=====================================  =====================================================
``nn.LayerNorm`` over the last axis    :class:`TokenBatchNorm`: BatchNorm over that axis
(tokens, NHWC, vectors)                (channels), affine copied, statistics re-estimated
timm ``Attention``, the cut            :class:`MatMulAttention`: separate q/k/v projections
``TokenAttention``                     (no Split or Gather), the 1/sqrt(d) scale folded into
                                       q, explicit MatMul-Softmax-MatMul (exact)
``nn.Embedding``                       :class:`OneHotEmbedding`: one-hot tokens times a
                                       fully connected layer (exact)
timm ``VisionTransformer`` pooling     :class:`TokenPool`: class token or token average as a
(``x[:, 0]``, ``x.mean(1)``)           MatMul with a constant row (exact)
=====================================  =====================================================

GELU becomes ReLU as for CNNs; the patch embedding is the patchify convolution of
:mod:`archnet.opconvert`; the class token and position embedding are constants of the
fixed-shape export (a Concat and an Add).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import LayerNorm as TimmLayerNorm
from torch import Tensor, nn

from archnet.opconvert import register_converter, register_rewrite

__all__ = [
    "MatMulAttention",
    "OneHotEmbedding",
    "TokenBatchNorm",
    "TokenPool",
    "attend",
    "exact_attention",
    "plain_attention",
    "restrict_block",
]


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last axis of ``(B, ..., C)`` features: LayerNorm's place, a chip's op.

    LayerNorm normalises each token over its channels; a chip folds BatchNorm's fixed per-channel
    scale and shift instead, so the statistics move to channels over batch and tokens.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return super().forward(x)
        shape = x.shape
        flat = x.reshape(shape[0], -1, shape[-1]) if x.dim() > 3 else x
        return super().forward(flat.transpose(1, 2)).transpose(1, 2).reshape(shape)


@register_converter(nn.LayerNorm, TimmLayerNorm)
def _layer_norm(m: nn.LayerNorm) -> nn.Module | None:
    if len(m.normalized_shape) != 1:
        return None
    bn = TokenBatchNorm(m.normalized_shape[0], eps=m.eps, affine=True)
    with torch.no_grad():
        if m.weight is not None:
            bn.weight.copy_(m.weight)
        if m.bias is not None:
            bn.bias.copy_(m.bias)
    return bn


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    quant: nn.ModuleDict | None = None,
    mask: Tensor | None = None,
    with_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``softmax(q k^T [+ mask]) v`` for ``(B, H, N, D)`` heads, q already scaled, written as the
    MatMul/Softmax/MatMul a chip runs; ``quant`` fake-quantizes the matmul inputs. A boolean
    mask keeps the positions where it is True, a float one is added to the scores.
    ``with_probs`` also returns the attention probabilities (before their quantizer)."""
    kt = k.transpose(-2, -1)
    if quant is not None:  # at the matmul inputs themselves, so a runtime fuses an integer MatMul
        q, kt, v = quant["q"](q), quant["k"](kt), quant["v"](v)
    scores = q @ kt
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    probs = scores.softmax(dim=-1)
    used = probs if quant is None else quant["probs"](probs)
    return (used @ v, probs) if with_probs else used @ v


class MatMulAttention(nn.Module):
    """Multi-head self-attention from Linear, Reshape, Transpose, MatMul and Softmax only.

    ``quant`` is ``None`` until :func:`archnet.quant.quantize_model` gives the two matmuls'
    inputs (q, k, v and the attention probabilities) their own quantizers.
    """

    def __init__(self, width: int, heads: int, head_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q, self.k, self.v = (nn.Linear(width, inner, bias=bias) for _ in range(3))
        self.proj = nn.Linear(inner, width)
        self.quant: nn.ModuleDict | None = None

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        b, n, _ = x.shape
        if is_causal:
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            if attn_mask is None or attn_mask.dtype == torch.bool:
                attn_mask = causal if attn_mask is None else attn_mask & causal
            else:
                attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        out = attend(
            self._heads(self.q(x)),
            self._heads(self.k(x)),
            self._heads(self.v(x)),
            self.quant,
            attn_mask,
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    def quantize_matmuls(self, bits: int) -> None:
        """Give q, k, v (sign from calibration) and the probabilities (unsigned) quantizers."""
        from archnet.quant.lsq import LSQQuantizer

        signed = {n: LSQQuantizer(bits, True, infer_sign=True) for n in ("q", "k", "v")}
        self.quant = nn.ModuleDict({**signed, "probs": LSQQuantizer(bits, False)})

    @classmethod
    @torch.no_grad()
    def from_fused(
        cls, qkv: nn.Linear, proj: nn.Linear, heads: int, scale: float | None = None
    ) -> MatMulAttention:
        """Split a fused ``qkv`` projection; the softmax scale goes into q's weights and bias."""
        inner = qkv.out_features // 3
        head_dim = inner // heads
        scale = head_dim**-0.5 if scale is None else scale
        new = cls(qkv.in_features, heads, head_dim)
        w = qkv.weight.reshape(3, inner, -1)
        b = qkv.bias.reshape(3, inner) if qkv.bias is not None else w.new_zeros(3, inner)
        for i, (layer, factor) in enumerate(zip((new.q, new.k, new.v), (scale, 1.0, 1.0))):
            layer.weight.copy_(w[i] * factor)
            layer.bias.copy_(b[i] * factor)
        new.proj.weight.copy_(proj.weight)
        new.proj.bias.copy_(proj.bias if proj.bias is not None else 0.0)
        return new


def plain_attention(attn: nn.Module | None) -> bool:
    """Whether ``attn`` is plain scaled-dot-product attention: no q/k norms, output norm or
    gate (parts a split into q/k/v, or a cut to fewer heads, would drop)."""
    parts = (getattr(attn, n, None) for n in ("q_norm", "k_norm", "norm", "gate"))
    return attn is not None and all(p is None or isinstance(p, nn.Identity) for p in parts)


@register_converter(TimmAttention, "TokenAttention")
def exact_attention(m: nn.Module) -> nn.Module | None:
    """timm's attention (plain, see :func:`plain_attention`) and the cut ``TokenAttention``."""
    if not plain_attention(m):
        return None
    heads = getattr(m, "num_heads", None) or getattr(m, "heads", None)
    return MatMulAttention.from_fused(m.qkv, m.proj, heads, getattr(m, "scale", None))


class OneHotEmbedding(nn.Module):
    """``Embedding`` as one-hot tokens times a fully connected layer (no Gather).

    A float input is taken as one-hot rows already (what a chip is fed); integer ids are
    expanded here, so the module stays a drop-in for the embedding it replaces.
    """

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.fc = nn.Linear(num_embeddings, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            x = F.one_hot(x, self.num_embeddings).to(self.fc.weight.dtype)
        return self.fc(x)


@register_converter(nn.Embedding)
def _embedding(m: nn.Embedding) -> nn.Module | None:
    if m.max_norm is not None:
        return None  # renormalises rows on lookup: not a fixed matrix
    new = OneHotEmbedding(m.num_embeddings, m.embedding_dim)
    with torch.no_grad():
        new.fc.weight.copy_(m.weight.t())
    return new


class TokenPool(nn.Module):
    """``(B, N, C) -> (B, C)`` as a constant ``(1, N)`` row times the tokens: the class token
    (a one-hot row) or the token mean (a uniform row), without Gather or ReduceMean."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.reshape(1, -1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (self.weights @ x).reshape(x.shape[0], x.shape[-1])


@register_rewrite("VisionTransformer")
def _vit_pool(model: nn.Module) -> list[tuple[str, str, str]]:
    """timm ViT: the pooling in ``forward_head`` moves into ``fc_norm`` as a :class:`TokenPool`."""
    pool = getattr(model, "global_pool", None)
    if pool not in ("token", "avg") or getattr(model, "attn_pool", None) is not None:
        return []
    if getattr(model, "dynamic_img_size", False):
        return []  # the token count changes with the input
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    n = prefix + int(model.patch_embed.num_patches)
    weights = torch.zeros(n)
    if pool == "token":
        weights[0] = 1.0
    else:
        start = 0 if getattr(model, "pool_include_prefix", False) else prefix
        weights[start:] = 1.0 / (n - start)
    ref = next(model.parameters())
    model.fc_norm = nn.Sequential(TokenPool(weights.to(ref)), model.fc_norm)
    model.global_pool = ""
    return [("pool", f"global_pool {pool!r}", "TokenPool (MatMul)")]


@torch.no_grad()
def restrict_block(block: nn.Module) -> nn.Module:
    """A pre-norm Transformer block (timm's, or a cut ``TokenBlock``) on Arch-Net's operators,
    in place: LayerScale folded into the projection before it, then every layer converted."""
    from archnet.opconvert import convert_modules

    for ls, layer in (("ls1", ("attn", "proj")), ("ls2", ("mlp", "fc2"))):
        scale = getattr(getattr(block, ls, None), "gamma", None)
        owner = getattr(block, layer[0], None)
        linear = getattr(owner, layer[1], None)
        if scale is None or not isinstance(linear, nn.Linear):
            continue
        linear.weight.mul_(scale[:, None])
        if linear.bias is not None:
            linear.bias.mul_(scale)
        setattr(block, ls, nn.Identity())
    convert_modules(block)
    return block
