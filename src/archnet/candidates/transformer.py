"""Transformer-block candidates, cut from the teacher's own block as NVIDIA's Puzzle does.

A pre-norm Transformer block (``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, as timm's
ViT and DeiT blocks) is made cheaper along the axes that cost: fewer attention heads, a
narrower MLP, no attention at all (an FFN-only block) or no MLP (attention only), and ReLU for
GELU. Each candidate starts from the teacher's weights: the heads and hidden neurons with the
largest weight norms are kept (a head's value rows times its output-projection columns; a
neuron's input row times its output column), so blockwise distillation starts near the block.
The identity and a linear replacement live in ``skip``.

The ``archnet_tf*`` candidates are the same cuts on Arch-Net's Transformer operators
(:func:`archnet.tokenconvert.restrict_block`): BatchNorm for LayerNorm, ReLU for GELU, attention
as MatMul/Softmax with separate q/k/v projections, LayerScale folded into the projections.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from archnet.blocks import BlockSpec
from archnet.tokenconvert import plain_attention, restrict_block

from ._registry import register_candidate

__all__ = ["TokenAttention", "TokenBlock", "TokenMlp", "is_vit_block"]


def is_vit_block(block: nn.Module | None) -> bool:
    """A timm-style pre-norm block: ``norm1``, ``attn.qkv``/``attn.proj``, ``norm2``, ``mlp``,
    with plain scaled-dot-product attention (no q/k norms, output norm or gate, which the cut
    would drop) and no norm inside the MLP."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    return (
        block is not None
        and plain_attention(attn)
        and isinstance(getattr(mlp, "norm", None), (nn.Identity, type(None)))
        and all(hasattr(block, n) for n in ("norm1", "norm2"))
        and isinstance(getattr(attn, "qkv", None), nn.Linear)
        and isinstance(getattr(attn, "proj", None), nn.Linear)
        and isinstance(getattr(attn, "num_heads", None), int)
        and isinstance(getattr(mlp, "fc1", None), nn.Linear)
        and isinstance(getattr(mlp, "fc2", None), nn.Linear)
    )


class TokenAttention(nn.Module):
    """Multi-head self-attention over ``(B, N, C)`` tokens with ``heads`` heads of ``head_dim``."""

    def __init__(self, width: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(width, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class TokenMlp(nn.Sequential):
    def __init__(self, width: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), act, nn.Linear(hidden, width)


class TokenBlock(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``; either half may be absent."""

    def __init__(
        self,
        norm1: nn.Module,
        attn: TokenAttention | None,
        ls1: nn.Module,
        norm2: nn.Module,
        mlp: TokenMlp | None,
        ls2: nn.Module,
    ) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = norm1, attn, ls1
        self.norm2, self.mlp, self.ls2 = norm2, mlp, ls2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.ls1(self.attn(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def _cut_attention(teacher: nn.Module, heads: int) -> TokenAttention:
    qkv, proj, total = teacher.qkv, teacher.proj, teacher.num_heads
    width, dim = qkv.in_features, qkv.out_features // (3 * total)
    w = qkv.weight.reshape(3, total, dim, width)
    value_rows = w[2].flatten(1).norm(dim=1)
    out_cols = proj.weight.reshape(proj.out_features, total, dim).permute(1, 0, 2).flatten(1)
    keep = _top(value_rows * out_cols.norm(dim=1), heads)
    cut = TokenAttention(width, heads, dim).to(qkv.weight)
    cut.qkv.weight.copy_(w[:, keep].reshape(-1, width))
    if qkv.bias is not None:
        cut.qkv.bias.copy_(qkv.bias.reshape(3, total, dim)[:, keep].reshape(-1))
    else:
        cut.qkv.bias.zero_()
    cut.proj.weight.copy_(proj.weight.reshape(-1, total, dim)[:, keep].flatten(1))
    cut.proj.bias.copy_(proj.bias if proj.bias is not None else torch.zeros_like(cut.proj.bias))
    return cut


@torch.no_grad()
def _cut_mlp(teacher: nn.Module, hidden: int, act: type[nn.Module] | None) -> TokenMlp:
    fc1, fc2 = teacher.fc1, teacher.fc2
    keep = _top(fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0), hidden)
    activation = act() if act else copy.deepcopy(getattr(teacher, "act", nn.GELU()))
    cut = TokenMlp(fc1.in_features, hidden, activation).to(fc1.weight)
    cut.fc1.weight.copy_(fc1.weight[keep])
    cut.fc1.bias.copy_(fc1.bias[keep] if fc1.bias is not None else 0)
    cut.fc2.weight.copy_(fc2.weight[:, keep])
    cut.fc2.bias.copy_(fc2.bias if fc2.bias is not None else torch.zeros_like(cut.fc2.bias))
    return cut


def _build(
    spec: BlockSpec,
    teacher: nn.Module | None,
    heads: float = 1.0,
    ffn: float = 1.0,
    act: type[nn.Module] | None = None,
) -> nn.Module | None:
    """The teacher block with ``heads`` of its heads and ``ffn`` of its hidden neurons kept
    (0: that half removed) and, with ``act``, another MLP activation."""
    if spec.context or not spec.same_shape or not is_vit_block(teacher):
        return None
    total, hidden = teacher.attn.num_heads, teacher.mlp.fc1.out_features
    keep_heads, keep_hidden = round(total * heads), round(hidden * ffn)
    if (heads and not keep_heads) or (ffn and not keep_hidden):
        return None  # too few heads or neurons to cut this fraction from
    attn = _cut_attention(teacher.attn, keep_heads) if keep_heads else None
    mlp = _cut_mlp(teacher.mlp, keep_hidden, act) if keep_hidden else None
    norm1, ls1, norm2, ls2 = (
        copy.deepcopy(getattr(teacher, n, nn.Identity())) for n in ("norm1", "ls1", "norm2", "ls2")
    )
    return TokenBlock(norm1, attn, ls1, norm2, mlp, ls2)


_VARIANTS = {
    # name: (kept share of heads, kept share of MLP neurons, activation; None: the teacher's)
    "tf_heads_half": (0.5, 1.0, None),
    "tf_ffn_half": (1.0, 0.5, None),
    "tf_ffn_quarter": (1.0, 0.25, None),
    "tf_heads_half_ffn_half": (0.5, 0.5, None),
    "tf_ffn_only": (0.0, 1.0, None),
    "tf_attn_only": (1.0, 0.0, None),
    "tf_relu": (1.0, 1.0, nn.ReLU),
    "tf_relu_ffn_half": (1.0, 0.5, nn.ReLU),
}
for _name, (_heads, _ffn, _act) in _VARIANTS.items():
    _tags = {"transformer"} | ({"relu"} if _act is nn.ReLU else set())

    def _builder(spec, teacher, heads=_heads, ffn=_ffn, act=_act):  # noqa: ANN001
        return _build(spec, teacher, heads, ffn, act)

    register_candidate(_name, "transformer", _tags, layouts=("tokens",), from_teacher=True)(
        _builder
    )


_ARCHNET_VARIANTS = {
    # name: (kept share of heads, kept share of MLP neurons), ReLU and restricted operators
    "archnet_tf": (1.0, 1.0),
    "archnet_tf_ffn_half": (1.0, 0.5),
    "archnet_tf_heads_half": (0.5, 1.0),
}
for _name, (_heads, _ffn) in _ARCHNET_VARIANTS.items():

    def _restricted(spec, teacher, heads=_heads, ffn=_ffn):  # noqa: ANN001
        block = _build(spec, teacher, heads, ffn, nn.ReLU)
        return None if block is None else restrict_block(block)

    register_candidate(
        _name,
        "archnet",
        {"archnet", "restricted", "transformer", "relu"},
        layouts=("tokens",),
        from_teacher=True,
    )(_restricted)
