"""HANT candidates for the layers of a :class:`~archnet.seq2seq.net.Seq2SeqNet`.

Every candidate is cut from the teacher's own layer (as NVIDIA's Puzzle does) and keeps the
layer's call signature and return values, so a ``Seq2SeqNet`` holding it runs ``forward``,
``encode``, ``decode`` and ``step`` (with its key/value cache) unchanged:

* encoder: ``layer(x, mask, keep) -> (out, probs)``
* decoder: ``layer(x, self_mask, cross_kv, cross_mask, keep, past=None)
  -> (out, self_probs, cross_probs, new_kv)``, and ``layer.cross_attn.memory_kv(memory)``
  gives the cross-attention keys/values once per sentence.

The pool (:data:`ENCODER_CANDIDATES`, :data:`DECODER_CANDIDATES`, name -> builder):

* ``keep``    the teacher layer (a copy)
* ``skip``    the identity
* ``heads50`` half the attention heads (in a decoder layer: of self- and cross-attention),
  the heads with the largest value-row x output-column weight norms kept
* ``ffn50``, ``ffn25`` half / a quarter of the FFN's hidden neurons, kept by input-row x
  output-column weight norm
* ``noffn``   the attention sublayer(s) only
* ``noattn``  (encoder) the FFN sublayer only
* ``noself``  (decoder) cross-attention and FFN: the self-attention sublayer dropped. Dropping
  cross-attention is not offered: the decoder must see the source.

A dropped sublayer is one whose output is zero: the post-norm ``n(h + f(h))`` becomes
``n(h)``, so the candidate starts at the teacher's layer with that sublayer silenced, and its
norm stays to be trained. Cheaper candidates hold smaller ``Linear`` layers (or none), so they
really compute less.

A layer without self-attention (``skip``, ``noself``) still answers ``step``'s cache protocol:
its cache entry is a tensor with zero heads, ``(B, 0, n, head_dim)``, which grows along dim 2
with every step like the other layers' entries (so ``past[i][0].shape[2]`` is the decoded
length for every layer) but holds nothing. Its attention probabilities (for
:class:`~archnet.seq2seq.net.Taps`) likewise have zero heads. A ``skip`` decoder layer's
``cross_attn`` is a :class:`NoAttention` whose ``memory_kv`` is empty, so ``net.cross_kv``
computes nothing for it.

:class:`CandidatePool` holds every layer's candidates (``encoder.0`` ... ``decoder.0`` ...),
as :func:`build_pool` cuts them and :func:`archnet.seq2seq.hant.train_candidates` trains them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from archnet.seq2seq.net import Attention, DecoderLayer, EncoderLayer, FeedForward, Seq2SeqNet

__all__ = [
    "DECODER_CANDIDATES",
    "UNTRAINED",
    "CandidatePool",
    "ENCODER_CANDIDATES",
    "DecoderCandidate",
    "EncoderCandidate",
    "NoAttention",
    "block_names",
    "build_candidate",
    "build_pool",
    "candidate_names",
    "cut_attention",
    "cut_ffn",
    "is_decoder_layer",
]

Builder = Callable[[nn.Module], nn.Module | None]


# --- cuts ---------------------------------------------------------------------------------------


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def cut_attention(attn: Attention, heads: int) -> Attention:
    """``attn`` with only its ``heads`` most important heads (value rows x output columns)."""
    total, dim = attn.heads, attn.head_dim
    width = attn.q.in_features
    value_rows = attn.v.weight.reshape(total, dim * width).norm(dim=1)
    out_cols = attn.proj.weight.reshape(-1, total, dim).permute(1, 0, 2).flatten(1).norm(dim=1)
    keep = _top(value_rows * out_cols, heads)
    cut = Attention(width, heads, dim).to(attn.q.weight)
    for name in ("q", "k", "v"):
        src, dst = getattr(attn, name), getattr(cut, name)
        dst.weight.copy_(src.weight.reshape(total, dim, width)[keep].reshape(-1, width))
        dst.bias.copy_(src.bias.reshape(total, dim)[keep].reshape(-1))
    cut.proj.weight.copy_(attn.proj.weight.reshape(-1, total, dim)[:, keep].flatten(1))
    cut.proj.bias.copy_(attn.proj.bias)
    return cut


@torch.no_grad()
def cut_ffn(ffn: FeedForward, hidden: int) -> FeedForward:
    """``ffn`` with only its ``hidden`` most important neurons (input row x output column)."""
    fc1, fc2 = ffn.fc1, ffn.fc2
    keep = _top(fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0), hidden)
    cut = FeedForward(fc1.in_features, hidden, copy.deepcopy(ffn.act)).to(fc1.weight)
    cut.fc1.weight.copy_(fc1.weight[keep])
    cut.fc1.bias.copy_(fc1.bias[keep])
    cut.fc2.weight.copy_(fc2.weight[:, keep])
    cut.fc2.bias.copy_(fc2.bias)
    return cut


# --- candidate layers ---------------------------------------------------------------------------


def _no_probs(x: Tensor, n_keys: int) -> Tensor:
    """Attention probabilities of a sublayer that is not there: zero heads."""
    return x.new_zeros(x.shape[0], 0, x.shape[1], n_keys)


def _empty_kv(x: Tensor, head_dim: int) -> Tensor:
    """Keys (or values) of ``x``'s positions from an attention that is not there: zero heads."""
    return x.new_zeros(x.shape[0], 0, x.shape[1], head_dim)


class NoAttention(nn.Module):
    """The cross-attention of a skipped decoder layer: its keys/values hold nothing."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        empty = _empty_kv(memory, self.head_dim)
        return empty, empty


class EncoderCandidate(nn.Module):
    """Post-norm encoder layer whose sublayers may be cut or absent:
    ``h = n1(x + attn(x))`` (``n1(x)`` without attention), ``n2(h + ffn(h))`` (``n2(h)``
    without FFN); with neither and no norms, the identity."""

    def __init__(
        self,
        attn: Attention | None,
        norm1: nn.Module | None,
        ffn: FeedForward | None,
        norm2: nn.Module | None,
    ) -> None:
        super().__init__()
        self.attn, self.norm1, self.ffn, self.norm2 = attn, norm1, ffn, norm2

    def forward(self, x: Tensor, mask: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        if self.attn is not None:
            a, probs, _ = self.attn(x, mask)
            x = x + a
        else:
            probs = _no_probs(x, x.shape[1])
        if self.norm1 is not None:
            x = self.norm1(x, keep)
        if self.ffn is not None:
            x = x + self.ffn(x)
        if self.norm2 is not None:
            x = self.norm2(x, keep)
        return x, probs


class DecoderCandidate(nn.Module):
    """Post-norm decoder layer whose self-attention and FFN may be cut or absent (the
    cross-attention may be cut, never dropped, except in ``skip``, the identity)."""

    def __init__(
        self,
        self_attn: Attention | None,
        norm1: nn.Module | None,
        cross_attn: Attention | NoAttention,
        norm2: nn.Module | None,
        ffn: FeedForward | None,
        norm3: nn.Module | None,
        head_dim: int,
    ) -> None:
        super().__init__()
        self.self_attn, self.norm1 = self_attn, norm1
        self.cross_attn, self.norm2 = cross_attn, norm2
        self.ffn, self.norm3 = ffn, norm3
        self.head_dim = head_dim

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        cross_kv: tuple[Tensor, Tensor],
        cross_mask: Tensor,
        keep: Tensor | None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        if self.self_attn is not None:
            a, self_probs, new_kv = self.self_attn(x, self_mask, past=past)
            x = x + a
        else:
            seen = x.shape[1] + (0 if past is None else past[0].shape[2])
            self_probs = _no_probs(x, seen)
            empty = _empty_kv(x, self.head_dim)
            new_kv = (empty, empty)
        if self.norm1 is not None:
            x = self.norm1(x, keep)
        if isinstance(self.cross_attn, Attention):
            c, cross_probs, _ = self.cross_attn(x, cross_mask, kv=cross_kv)
            x = self.norm2(x + c, keep)
        else:
            cross_probs = _no_probs(x, cross_kv[0].shape[2])
        if self.ffn is not None:
            x = x + self.ffn(x)
        if self.norm3 is not None:
            x = self.norm3(x, keep)
        return x, self_probs, cross_probs, new_kv


# --- builders -----------------------------------------------------------------------------------


def _copy(module: nn.Module | None) -> nn.Module | None:
    return None if module is None else copy.deepcopy(module)


def _heads(attn: Attention, share: float) -> Attention | None:
    """``attn`` cut to ``share`` of its heads, a copy at 1.0, None when nothing would remain
    or nothing would be cut."""
    if share == 1.0:
        return copy.deepcopy(attn)
    n = round(attn.heads * share)
    return cut_attention(attn, n) if 0 < n < attn.heads else None


def _hidden(ffn: FeedForward, share: float) -> FeedForward | None:
    if share == 1.0:
        return copy.deepcopy(ffn)
    n = round(ffn.fc1.out_features * share)
    return cut_ffn(ffn, n) if 0 < n < ffn.fc1.out_features else None


def _encoder(heads: float, hidden: float) -> Builder:
    """Builder of an encoder candidate with ``heads`` / ``hidden`` shares kept (0: dropped)."""

    def build(layer: nn.Module) -> nn.Module | None:
        attn = _heads(layer.attn, heads) if heads else None
        ffn = _hidden(layer.ffn, hidden) if hidden else None
        if (heads and attn is None) or (hidden and ffn is None):
            return None  # too few heads or neurons to cut this share from
        return EncoderCandidate(attn, _copy(layer.norm1), ffn, _copy(layer.norm2))

    return build


def _decoder(self_heads: float, cross_heads: float, hidden: float) -> Builder:
    def build(layer: nn.Module) -> nn.Module | None:
        self_attn = _heads(layer.self_attn, self_heads) if self_heads else None
        cross = _heads(layer.cross_attn, cross_heads)
        ffn = _hidden(layer.ffn, hidden) if hidden else None
        if (self_heads and self_attn is None) or cross is None or (hidden and ffn is None):
            return None
        return DecoderCandidate(
            self_attn,
            _copy(layer.norm1),
            cross,
            _copy(layer.norm2),
            ffn,
            _copy(layer.norm3),
            layer.self_attn.head_dim,
        )

    return build


def _keep(layer: nn.Module) -> nn.Module:
    return copy.deepcopy(layer)


def _skip_encoder(layer: nn.Module) -> nn.Module:  # noqa: ARG001
    return EncoderCandidate(None, None, None, None)


def _skip_decoder(layer: nn.Module) -> nn.Module:
    dim = layer.self_attn.head_dim
    return DecoderCandidate(None, None, NoAttention(dim), None, None, None, dim)


ENCODER_CANDIDATES: dict[str, Builder] = {
    "keep": _keep,
    "skip": _skip_encoder,
    "heads50": _encoder(0.5, 1.0),
    "ffn50": _encoder(1.0, 0.5),
    "ffn25": _encoder(1.0, 0.25),
    "noffn": _encoder(1.0, 0.0),
    "noattn": _encoder(0.0, 1.0),
}
"""Encoder-layer candidates: name -> builder(teacher layer) (None: not applicable to it)."""

DECODER_CANDIDATES: dict[str, Builder] = {
    "keep": _keep,
    "skip": _skip_decoder,
    "heads50": _decoder(0.5, 0.5, 1.0),
    "ffn50": _decoder(1.0, 1.0, 0.5),
    "ffn25": _decoder(1.0, 1.0, 0.25),
    "noffn": _decoder(1.0, 1.0, 0.0),
    "noself": _decoder(0.0, 1.0, 1.0),
}
"""Decoder-layer candidates: name -> builder(teacher layer). No ``nocross``: the decoder
must see the source."""

UNTRAINED = frozenset({"keep", "skip"})
"""Candidates that blockwise training leaves as they are (the teacher's layer, the identity)."""


def is_decoder_layer(layer: nn.Module) -> bool:
    """Whether ``layer`` is (a candidate for) a decoder layer."""
    return isinstance(layer, (DecoderLayer, DecoderCandidate))


def _registry(layer: nn.Module) -> dict[str, Builder]:
    if isinstance(layer, DecoderLayer):
        return DECODER_CANDIDATES
    if isinstance(layer, EncoderLayer):
        return ENCODER_CANDIDATES
    raise TypeError(f"no HANT candidates for a {type(layer).__name__}; give a teacher layer")


def candidate_names(layer: nn.Module) -> list[str]:
    """Names of the candidates that apply to the teacher ``layer``, in registry order."""
    return [name for name, build in _registry(layer).items() if build(layer) is not None]


def build_candidate(name: str, layer: nn.Module) -> nn.Module | None:
    """Candidate ``name`` cut from the teacher ``layer`` (its weights copied), or None when
    it does not apply (too few heads or neurons to cut from)."""
    registry = _registry(layer)
    if name not in registry:
        kind = "decoder" if registry is DECODER_CANDIDATES else "encoder"
        raise KeyError(f"unknown {kind}-layer candidate {name!r}; known: {', '.join(registry)}")
    return registry[name](layer)


# --- the pool -----------------------------------------------------------------------------------


def block_names(net: Seq2SeqNet) -> list[str]:
    """The searched blocks: ``encoder.0`` ... then ``decoder.0`` ..."""
    return [f"encoder.{i}" for i in range(len(net.encoder))] + [
        f"decoder.{i}" for i in range(len(net.decoder))
    ]


@dataclass
class CandidatePool:
    """Per block (in :func:`block_names` order), its candidates by name and their blockwise
    losses (masked normalized MSE to the teacher layer's output) before and after training."""

    blocks: list[str]
    modules: list[dict[str, nn.Module]]
    start_loss: list[dict[str, float]] = field(default_factory=list)
    final_loss: list[dict[str, float]] = field(default_factory=list)

    @property
    def names(self) -> list[list[str]]:
        return [list(m) for m in self.modules]

    def state_dict(self) -> dict[str, Any]:
        """Weights and losses, to save with ``torch.save`` and reload with :meth:`from_state`."""
        return {
            "blocks": list(self.blocks),
            "names": self.names,
            "weights": [{k: m.state_dict() for k, m in per.items()} for per in self.modules],
            "start_loss": self.start_loss,
            "final_loss": self.final_loss,
        }

    @classmethod
    def from_state(cls, teacher: Seq2SeqNet, state: dict[str, Any]) -> CandidatePool:
        """The pool saved by :meth:`state_dict`, rebuilt by cutting ``teacher`` again."""
        modules = []
        for block, names, weights in zip(state["blocks"], state["names"], state["weights"]):
            layer = teacher.get_submodule(block)
            per = {}
            for name in names:
                module = build_candidate(name, layer)
                module.load_state_dict(weights[name])
                per[name] = module.eval()
            modules.append(per)
        return cls(list(state["blocks"]), modules, state["start_loss"], state["final_loss"])


def build_pool(teacher: Seq2SeqNet, names: Sequence[str] | None = None) -> CandidatePool:
    """Every candidate of every layer, cut from the teacher and untrained. ``names`` limits
    the pool (names that do not apply to a layer are left out there); ``keep`` is always in."""
    known = {*ENCODER_CANDIDATES, *DECODER_CANDIDATES}
    unknown = sorted(set(names or ()) - known)
    if unknown:
        raise KeyError(f"unknown candidates {unknown}; known: {', '.join(sorted(known))}")
    blocks = block_names(teacher)
    modules = []
    for block in blocks:
        layer = teacher.get_submodule(block)
        per = {}
        for name, build in _registry(layer).items():
            if names is None or name in names or name == "keep":
                module = build(layer)
                if module is not None:
                    per[name] = module.eval()
        modules.append(per)
    return CandidatePool(blocks, modules)
