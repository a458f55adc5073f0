"""Arch-Net's restricted encoder-decoder: LayerNorm -> BatchNorm, GELU/SiLU -> ReLU, Embedding ->
one-hot x fully connected; softmax, both attention matmuls, masks and residual adds stay.

The student starts from the teacher's weights (a copy), so distillation only has to undo what
the swaps change. A BatchNorm's statistics must describe real tokens, so padding is left out
of them (:class:`MaskedBatchNorm`) and they are measured on the data before training starts
(:func:`reset_batch_norms`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from archnet.seq2seq.net import FeedForward, Norm, Seq2SeqNet
from archnet.tokenconvert import OneHotEmbedding, TokenBatchNorm

__all__ = ["MaskedBatchNorm", "reset_batch_norms", "restrict_seq2seq"]


class MaskedBatchNorm(TokenBatchNorm):
    """BatchNorm over d_model whose training statistics come from the real tokens only.

    Padding is as much as a third of a length-bucketed batch; counted in, it would pull the
    mean towards the pad rows the model never uses. At inference the running statistics are
    a fixed scale and shift, which a runtime folds into the next layer.
    """

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if not self.training or keep is None:
            return super().forward(x)
        real = x[keep]
        mean, var = real.mean(0), real.var(0, unbiased=False)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1 / int(self.num_batches_tracked)
            unbiased = var * len(real) / max(len(real) - 1, 1)
            self.running_mean.lerp_(mean, m)
            self.running_var.lerp_(unbiased, m)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def _batch_norm(norm: nn.LayerNorm) -> MaskedBatchNorm:
    bn = MaskedBatchNorm(norm.normalized_shape[0], eps=norm.eps)
    with torch.no_grad():
        bn.weight.copy_(norm.weight)
        bn.bias.copy_(norm.bias)
    return bn


def restrict_seq2seq(teacher: Seq2SeqNet) -> Seq2SeqNet:
    """A copy of ``teacher`` built from the restricted operator set (the teacher is unchanged).

    The embedding's scale is folded into the one-hot layer, and the output layer keeps its own
    copy of the (tied) embedding matrix, so the two can be trained and quantized apart.
    """
    student = copy.deepcopy(teacher)
    for name, module in list(student.named_modules()):
        if isinstance(module, Norm):
            student.set_submodule(name, _batch_norm(module))
        elif isinstance(module, FeedForward):
            module.act = nn.ReLU()
    onehot = OneHotEmbedding(teacher.vocab, teacher.embed.embedding_dim)
    with torch.no_grad():
        onehot.fc.weight.copy_(teacher.embed.weight.t() * teacher.embed_scale)
    student.embed, student.embed_scale = onehot, 1.0
    return student


@torch.no_grad()
def reset_batch_norms(net: Seq2SeqNet, batches: Iterable[tuple[Tensor, Tensor]]) -> int:
    """Set every BatchNorm's running statistics to their average over ``batches`` of
    (source ids, decoder input ids); returns the number of batches used."""
    norms = [m for m in net.modules() if isinstance(m, MaskedBatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    was_training = net.training
    net.train()
    count = 0
    for src, tgt in batches:
        net(src, tgt)
        count += 1
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    net.train(was_training)
    return count
