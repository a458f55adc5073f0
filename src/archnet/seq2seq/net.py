"""An encoder-decoder Transformer whose every operation is a module archnet can swap.

A Hugging Face Marian or BART model computes attention, masks and caches inside library code
that changes between releases. :func:`from_hf` copies its weights into :class:`Seq2SeqNet`,
which computes the same function (checked in the tests against ``transformers``) from plain
layers: every norm, activation and embedding is a submodule, every attention is a
:class:`~archnet.tokenconvert.MatMulAttention`, so the Arch-Net conversion is a module swap and
the same code serves as teacher (LayerNorm, SiLU/GELU, Gather embeddings) and student.

Masks are additive (0 where attended, ``NEG`` elsewhere), the form a chip and an ONNX graph
take as an input; ``keep`` (batch x tokens, True on real tokens) tells the norms which tokens
are padding, so a BatchNorm's statistics never see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from archnet.errors import ArchnetError
from archnet.tokenconvert import MatMulAttention, attend

__all__ = ["NEG", "Seq2SeqNet", "Taps", "additive_mask", "causal_mask", "from_hf"]

NEG = -1e9  # added to masked attention scores: exp() gives exactly 0, never a NaN


def additive_mask(keep: Tensor) -> Tensor:
    """``(B, N)`` True-on-real-tokens -> ``(B, 1, 1, N)`` additive key mask."""
    return (~keep)[:, None, None, :].float() * NEG


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """``(1, 1, n, n)``: query i attends keys 0..i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1).float()[None, None] * NEG


class Norm(nn.LayerNorm):
    """LayerNorm that takes (and ignores) the padding mask, so norms are interchangeable."""

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:  # noqa: ARG002
        return super().forward(x)


class Attention(MatMulAttention):
    """Self- or cross-attention returning its probabilities (distillation targets) and the
    keys/values it computed (a decoder's cache); q carries the 1/sqrt(d) scale."""

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        mask: Tensor | None = None,
        memory: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        b, n, _ = x.shape
        if kv is None:
            source = x if memory is None else memory
            kv = (self._heads(self.k(source)), self._heads(self.v(source)))
        k, v = kv
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        out, probs = attend(self._heads(self.q(x)), k, v, self.quant, mask, with_probs=True)
        out = self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
        return out, probs, kv

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of the encoder output, computed once per sentence."""
        return self._heads(self.k(memory)), self._heads(self.v(memory))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), act, nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Post-norm (Marian, BART): ``n1(x + attn(x))``, then ``n2(h + ffn(h))``."""

    def __init__(self, width: int, heads: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.attn = Attention(width, heads, width // heads)
        self.norm1 = Norm(width)
        self.ffn = FeedForward(width, hidden, act)
        self.norm2 = Norm(width)

    def forward(self, x: Tensor, mask: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        a, probs, _ = self.attn(x, mask)
        h = self.norm1(x + a, keep)
        return self.norm2(h + self.ffn(h), keep), probs


class DecoderLayer(nn.Module):
    """Post-norm self-attention (causal, cached), cross-attention, feed-forward."""

    def __init__(self, width: int, heads: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.self_attn = Attention(width, heads, width // heads)
        self.norm1 = Norm(width)
        self.cross_attn = Attention(width, heads, width // heads)
        self.norm2 = Norm(width)
        self.ffn = FeedForward(width, hidden, act)
        self.norm3 = Norm(width)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        cross_kv: tuple[Tensor, Tensor],
        cross_mask: Tensor,
        keep: Tensor | None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        a, self_probs, new_kv = self.self_attn(x, self_mask, past=past)
        h = self.norm1(x + a, keep)
        c, cross_probs, _ = self.cross_attn(h, cross_mask, kv=cross_kv)
        h = self.norm2(h + c, keep)
        return self.norm3(h + self.ffn(h), keep), self_probs, cross_probs, new_kv


@dataclass
class Taps:
    """What the progressive schedule distils, in schedule order: the encoder input, each
    encoder layer, the decoder input, each decoder layer (hidden states), and each layer's
    attention maps (encoder self; decoder self and cross)."""

    hidden: list[Tensor] = field(default_factory=list)
    attention: list[list[Tensor]] = field(default_factory=list)  # one list per hidden entry


class Seq2SeqNet(nn.Module):
    """Encoder-decoder with one token embedding (shared by both sides), constant position
    vectors (one table per side: BART learns two), optional embedding norms and an output
    layer with bias.

    ``embed_scale`` multiplies the token embedding (Marian's sqrt(d)); the Arch-Net conversion
    folds it into the one-hot layer's weights.
    """

    def __init__(
        self,
        vocab: int,
        width: int,
        heads: int,
        hidden: int,
        layers: tuple[int, int],
        positions: Tensor,
        act: nn.Module,
        pad: int,
        eos: int,
        start: int,
        embed_scale: float = 1.0,
        embed_norm: bool = False,
        dec_positions: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.pad, self.eos, self.start, self.embed_scale = pad, eos, start, embed_scale
        self.embed = nn.Embedding(vocab, width)
        self.register_buffer("positions", positions.clone())
        dec = positions if dec_positions is None else dec_positions
        self.register_buffer("dec_positions", dec.clone())
        self.enc_norm = Norm(width) if embed_norm else None
        self.dec_norm = Norm(width) if embed_norm else None
        self.encoder = nn.ModuleList(
            EncoderLayer(width, heads, hidden, _fresh(act)) for _ in range(layers[0])
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(width, heads, hidden, _fresh(act)) for _ in range(layers[1])
        )
        self.head = nn.Linear(width, vocab)

    @property
    def vocab(self) -> int:
        return self.head.out_features

    @property
    def max_positions(self) -> int:
        return self.positions.shape[0]

    def _embed(
        self, tokens: Tensor, table: Tensor, start: int, norm: nn.Module | None, keep: Tensor | None
    ) -> Tensor:
        x = self.embed(tokens) * self.embed_scale
        x = x + table[start : start + x.shape[1]]
        return x if norm is None else norm(x, keep)

    def encode(self, src: Tensor, keep: Tensor, taps: Taps | None = None) -> Tensor:
        """Encoder output for token ids (or one-hot rows) ``src``; ``keep`` marks real tokens."""
        mask = additive_mask(keep)
        x = self._embed(src, self.positions, 0, self.enc_norm, keep)
        if taps is not None:
            taps.hidden.append(x)
            taps.attention.append([])
        for layer in self.encoder:
            x, probs = layer(x, mask, keep)
            if taps is not None:
                taps.hidden.append(x)
                taps.attention.append([probs])
        return x

    def cross_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [layer.cross_attn.memory_kv(memory) for layer in self.decoder]

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        src_keep: Tensor,
        tgt_keep: Tensor | None = None,
        taps: Taps | None = None,
    ) -> Tensor:
        """Teacher-forced decoder output (before the output layer) for the whole ``tgt``."""
        self_mask = causal_mask(tgt.shape[1], tgt.device)  # padding comes last: never attended
        cross_mask = additive_mask(src_keep)
        x = self._embed(tgt, self.dec_positions, 0, self.dec_norm, tgt_keep)
        if taps is not None:
            taps.hidden.append(x)
            taps.attention.append([])
        for layer, kv in zip(self.decoder, self.cross_kv(memory)):
            x, self_probs, cross_probs, _ = layer(x, self_mask, kv, cross_mask, tgt_keep)
            if taps is not None:
                taps.hidden.append(x)
                taps.attention.append([self_probs, cross_probs])
        return x

    def keeps(self, src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        """Real-token masks of padded source ids and decoder inputs."""
        tgt_keep = tgt.ne(self.pad)
        tgt_keep[:, 0] = True  # Marian starts decoding from the pad token
        return src.ne(self.pad), tgt_keep

    def forward(self, src: Tensor, tgt: Tensor, taps: Taps | None = None) -> Tensor:
        """Logits ``(B, T, vocab)`` of the next token after each ``tgt`` position (ids,
        padded with ``pad``; decoder inputs start with the start token)."""
        src_keep, tgt_keep = self.keeps(src, tgt)
        memory = self.encode(src, src_keep, taps)
        return self.head(self.decode(tgt, memory, src_keep, tgt_keep, taps))

    def step(
        self,
        token: Tensor,
        position: int,
        cross: list[tuple[Tensor, Tensor]],
        cross_mask: Tensor,
        past: list[tuple[Tensor, Tensor]] | None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """One decoding step: logits ``(B, vocab)`` for ``token`` ``(B, 1)`` at ``position``
        and each layer's cache grown by this step's keys and values."""
        x = self._embed(token, self.dec_positions, position, self.dec_norm, None)
        caches = []
        for i, (layer, kv) in enumerate(zip(self.decoder, cross)):
            before = None if past is None else past[i]
            x, _, _, new = layer(x, None, kv, cross_mask, None, before)
            if before is not None:
                new = (torch.cat([before[0], new[0]], 2), torch.cat([before[1], new[1]], 2))
            caches.append(new)
        return self.head(x)[:, -1], caches


def _fresh(act: nn.Module) -> nn.Module:
    return type(act)() if not list(act.parameters()) else act


# --- Hugging Face models ------------------------------------------------------------------------


def _hf_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    core = getattr(model, "model", None)
    enc, dec = getattr(core, "encoder", None), getattr(core, "decoder", None)
    if enc is None or dec is None or not hasattr(model, "lm_head"):
        raise ArchnetError(
            f"{type(model).__name__} is not a Marian/BART-layout encoder-decoder (model.encoder, "
            "model.decoder, lm_head); give a MarianMTModel or BartForConditionalGeneration"
        )
    return core, enc, dec


def _positions(module: nn.Module, n: int) -> Tensor:
    """The first ``n`` position vectors: Marian's sinusoids, or BART's learned table (which
    starts at offset 2)."""
    weight = module.weight.detach()
    offset = int(getattr(module, "offset", 0))
    return weight[offset : offset + n].clone()


def _copy_linear(dst: nn.Linear, src: nn.Linear, scale: float = 1.0) -> None:
    dst.weight.copy_(src.weight * scale)
    dst.bias.copy_(src.bias * scale if src.bias is not None else torch.zeros_like(dst.bias))


def _copy_attention(dst: Attention, src: nn.Module) -> None:
    _copy_linear(dst.q, src.q_proj, float(src.scaling))
    _copy_linear(dst.k, src.k_proj)
    _copy_linear(dst.v, src.v_proj)
    _copy_linear(dst.proj, src.out_proj)


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    dst.load_state_dict(src.state_dict())
    dst.eps = src.eps


@torch.no_grad()
def from_hf(model: nn.Module, max_positions: int | None = None) -> Seq2SeqNet:
    """The same function as a Marian or (post-norm) BART ``*ForConditionalGeneration``, as a
    :class:`Seq2SeqNet` holding copies of its weights."""
    core, enc, dec = _hf_parts(model)
    cfg = model.config
    if getattr(cfg, "normalize_before", False) or getattr(enc, "layer_norm", None) is not None:
        raise ArchnetError(
            f"{type(model).__name__} normalises before each sublayer (pre-norm); archnet converts "
            "post-norm Marian/BART models"
        )
    n = max_positions or int(cfg.max_position_embeddings)
    enc_layer = enc.layers[0]
    net = Seq2SeqNet(
        vocab=int(model.lm_head.out_features),
        width=int(cfg.d_model),
        heads=int(cfg.encoder_attention_heads),
        hidden=int(cfg.encoder_ffn_dim),
        layers=(len(enc.layers), len(dec.layers)),
        positions=_positions(enc.embed_positions, n),
        act=enc_layer.activation_fn,
        pad=int(cfg.pad_token_id),
        eos=int(cfg.eos_token_id),
        start=int(cfg.decoder_start_token_id),
        embed_scale=float(getattr(enc, "embed_scale", 1.0) or 1.0),
        embed_norm=getattr(enc, "layernorm_embedding", None) is not None,
        dec_positions=_positions(dec.embed_positions, n),
    )
    if not torch.equal(enc.embed_tokens.weight, dec.embed_tokens.weight):
        raise ArchnetError("the encoder and decoder embeddings differ; archnet shares one")
    net.embed.weight.copy_(enc.embed_tokens.weight)
    if net.enc_norm is not None:
        _copy_norm(net.enc_norm, enc.layernorm_embedding)
        _copy_norm(net.dec_norm, dec.layernorm_embedding)
    for mine, theirs in zip(net.encoder, enc.layers):
        _copy_attention(mine.attn, theirs.self_attn)
        _copy_norm(mine.norm1, theirs.self_attn_layer_norm)
        _copy_linear(mine.ffn.fc1, theirs.fc1)
        _copy_linear(mine.ffn.fc2, theirs.fc2)
        _copy_norm(mine.norm2, theirs.final_layer_norm)
    for mine, theirs in zip(net.decoder, dec.layers):
        _copy_attention(mine.self_attn, theirs.self_attn)
        _copy_norm(mine.norm1, theirs.self_attn_layer_norm)
        _copy_attention(mine.cross_attn, theirs.encoder_attn)
        _copy_norm(mine.norm2, theirs.encoder_attn_layer_norm)
        _copy_linear(mine.ffn.fc1, theirs.fc1)
        _copy_linear(mine.ffn.fc2, theirs.fc2)
        _copy_norm(mine.norm3, theirs.final_layer_norm)
    net.head.weight.copy_(model.lm_head.weight)
    bias = getattr(model, "final_logits_bias", None)
    net.head.bias.copy_(bias.reshape(-1) if bias is not None else torch.zeros(net.vocab))
    return net.eval()


def layer_names(net: Seq2SeqNet) -> Sequence[str]:
    """Names of the distillation targets, in :class:`Taps` order."""
    enc = [f"encoder.{i}" for i in range(len(net.encoder))]
    dec = [f"decoder.{i}" for i in range(len(net.decoder))]
    return ["encoder.embed", *enc, "decoder.embed", *dec]
