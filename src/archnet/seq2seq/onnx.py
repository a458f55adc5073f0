"""ONNX export of a :class:`~archnet.seq2seq.net.Seq2SeqNet` as the two graphs a deployment runs,
and an onnxruntime greedy decoder over them (their latency: :mod:`archnet.seq2seq.timing`).

A translation is one encoder run and then one decoder step per output token, so a chip (or
onnxruntime) holds two graphs:

* ``encoder.onnx``: ``src`` (a student's one-hot rows ``(B, N, V)``, what a chip is fed; a
  teacher's int64 ids ``(B, N)``) and ``src_mask`` (additive, ``(B, 1, 1, N)``) in; every
  decoder layer's cross-attention keys and values ``cross_k_i``/``cross_v_i`` ``(B, H, N, dh)``
  out, so a step never recomputes them.
* ``decoder_step.onnx``: one token with a fixed-size self-attention cache of ``max_len`` slots.
  In: ``token`` (one-hot ``(B, 1, V)`` or ids ``(B, 1)``), ``position`` (one-hot ``(B, 1,
  max_len)``, multiplied with the position table: a MatMul, not a Gather), ``self_mask``
  (``(B, 1, 1, max_len + 1)``: the slots not yet written masked, the current token attended),
  ``past_k_i``/``past_v_i`` ``(B, H, max_len, dh)``, ``cross_k_i``/``cross_v_i`` and
  ``cross_mask``. Out: ``logits`` ``(B, V)`` and this token's ``new_k_i``/``new_v_i`` ``(B, H,
  1, dh)``, which the host writes into slot ``t``. A fixed cache keeps every shape static
  (a growing one would need shape arithmetic a chip does not run).

Both graphs are computed by small wrappers over the net's own submodules (the same layers,
BatchNorms and quantizers that were trained), written so that a student's graphs use only
MatMul, Gemm, Add, Softmax, Reshape, Transpose, Concat, BatchNormalization and Relu: heads are
split with ``Reshape`` to fixed sizes (the batch is the only ``-1``), norms see ``(B * N, C)``,
logits come from a reshape instead of ``[:, -1]``. With ``src_len`` the source length is fixed
(what a chip runs and what the target checker sees; the host pads sources to it); without it
the encoder takes any length, at the price of shape arithmetic (Shape, Gather, Slice) in the
encoder graph. A fake-quantized student is exported as QDQ (``archnet.quant.export``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from archnet.errors import ArchnetError
from archnet.onnx_utils import OnnxIO, export_onnx, ort_session
from archnet.quant.api import is_quantized
from archnet.quant.export import export_qdq
from archnet.quant.lsq import float_mode
from archnet.seq2seq.net import NEG, Seq2SeqNet
from archnet.targets.check import CheckReport, check_report
from archnet.targets.target import Target, load_target
from archnet.tokenconvert import OneHotEmbedding, attend

__all__ = [
    "DECODER_FILE",
    "ENCODER_FILE",
    "OnnxTranslator",
    "Seq2SeqOnnx",
    "check_seq2seq",
    "export_seq2seq",
]

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder_step.onnx"
_EXAMPLE_BATCH = 2  # > 1, so no exporter mistakes the (dynamic) batch axis for a constant 1


# --- the graphs, as wrappers over the net's own modules -------------------------------------------


def _heads(rows: Tensor, heads: int, head_dim: int, n: int | Tensor) -> Tensor:
    """``(B * n, H * dh)`` rows -> ``(B, H, n, dh)``, the batch the only unknown size (every
    size is a Python int: a traced ``x.shape`` would become Shape/Gather nodes)."""
    if isinstance(n, int) and n == 1:  # same memory order: no Transpose
        return rows.reshape(-1, heads, 1, head_dim)
    return rows.reshape(-1, n, heads, head_dim).transpose(1, 2)


def _rows(x: Tensor, inner: int, n: int | Tensor) -> Tensor:
    """``(B, H, n, dh) -> (B * n, H * dh)``."""
    if isinstance(n, int) and n == 1:
        return x.reshape(-1, inner)
    return x.transpose(1, 2).reshape(-1, inner)


def _norm(norm: nn.Module | None, rows: Tensor) -> Tensor:
    return rows if norm is None else norm(rows)


def _embed(embed: nn.Module, scale: float, tokens: Tensor, vocab: int) -> Tensor:
    """Token rows ``(B * n, C)`` from one-hot ``(B, n, V)`` or ids ``(B, n)``."""
    flat = tokens.reshape(-1, vocab) if tokens.is_floating_point() else tokens.reshape(-1)
    x = embed(flat)
    return x if scale == 1.0 else x * scale  # a student has the scale folded in: no Mul


# Every hidden state is kept as (B * n, C) rows: each Linear is then one Gemm and each norm
# one BatchNormalization (or LayerNormalization), with no reshape whose size depends on the
# batch (a quantized Linear given (B, n, C) reshapes by its input's traced shape).


def _has(module: nn.Module | None) -> bool:
    """Whether an attention sublayer computes something (a HANT candidate may drop it: None,
    or a skipped layer's empty cross-attention)."""
    return module is not None and hasattr(module, "q")


def _sublayers(layer: nn.Module, rows: Tensor, n: int | Tensor, mask: Tensor) -> Tensor:
    """An encoder layer (or a HANT cut of one) on ``(B * n, C)`` rows, post-norm; a dropped
    sublayer or norm is skipped."""
    attn = getattr(layer, "attn", None)
    x = rows
    if _has(attn):
        q, k, v = (_heads(f(x), attn.heads, attn.head_dim, n) for f in (attn.q, attn.k, attn.v))
        x = x + attn.proj(_rows(attend(q, k, v, attn.quant, mask), attn.proj.in_features, n))
    x = _norm(layer.norm1, x)
    if layer.ffn is not None:
        x = x + layer.ffn(x)
    return _norm(layer.norm2, x)


class _Encoder(nn.Module):
    """Encoder plus every decoder layer's cross-attention keys and values.

    Holds only the modules it runs (the encoder, the embedding and the decoder's k/v layers),
    so a QDQ export finds each of its quantizers in the graph."""

    def __init__(self, net: Seq2SeqNet, src_len: int | None) -> None:
        super().__init__()
        self.embed, self.embed_scale, self.norm = net.embed, net.embed_scale, net.enc_norm
        self.vocab, self.width = net.vocab, net.head.in_features
        self.layers = net.encoder
        crossing = [layer.cross_attn for layer in net.decoder if _has(layer.cross_attn)]
        self.cross_k = nn.ModuleList(attn.k for attn in crossing)
        self.cross_v = nn.ModuleList(attn.v for attn in crossing)
        self.cross_shape = [(attn.heads, attn.head_dim) for attn in crossing]
        self.src_len = src_len
        table = net.positions if src_len is None else net.positions[:src_len]
        self.register_buffer("positions", table.detach().clone())

    def forward(self, src: Tensor, src_mask: Tensor) -> tuple[Tensor, ...]:
        n = self.src_len if self.src_len is not None else src.shape[1]
        pos = self.positions if self.src_len is not None else self.positions[:n]
        x = _embed(self.embed, self.embed_scale, src, self.vocab).reshape(-1, n, self.width)
        x = _norm(self.norm, (x + pos).reshape(-1, self.width))
        for layer in self.layers:
            x = _sublayers(layer, x, n, src_mask)
        out: list[Tensor] = []
        for k, v, (heads, dim) in zip(self.cross_k, self.cross_v, self.cross_shape):
            out += [_heads(k(x), heads, dim, n), _heads(v(x), heads, dim, n)]
        return tuple(out)


class _StepLayer(nn.Module):
    """A decoder layer's modules a step runs: all but the cross-attention k/v layers. A HANT
    cut may lack the self-attention (no cache) or, skipped whole, the cross-attention."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.self_attn = layer.self_attn if _has(layer.self_attn) else None
        self.norm1 = layer.norm1
        cross = layer.cross_attn
        self.crossing = _has(cross)
        if self.crossing:
            self.cross_q, self.cross_proj, self.cross_quant = cross.q, cross.proj, cross.quant
            self.heads, self.head_dim = cross.heads, cross.head_dim
        self.norm2, self.ffn, self.norm3 = layer.norm2, layer.ffn, layer.norm3

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor,
        past: tuple[Tensor, ...],
        cross: tuple[Tensor, ...],
        cross_mask: Tensor,
    ) -> tuple[Tensor, ...]:
        """(rows, this step's keys and values, or nothing without self-attention)."""
        new: tuple[Tensor, ...] = ()
        attn = self.self_attn
        if attn is not None:
            q, k, v = (_heads(f(x), attn.heads, attn.head_dim, 1) for f in (attn.q, attn.k, attn.v))
            keys, values = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            a = attend(q, keys, values, attn.quant, self_mask)
            x = x + attn.proj(_rows(a, attn.proj.in_features, 1))
            new = (k, v)
        h = _norm(self.norm1, x)
        if self.crossing:
            q = _heads(self.cross_q(h), self.heads, self.head_dim, 1)
            c = attend(q, cross[0], cross[1], self.cross_quant, cross_mask)
            h = h + self.cross_proj(_rows(c, self.cross_proj.in_features, 1))
        h = _norm(self.norm2, h)
        if self.ffn is not None:
            h = h + self.ffn(h)
        return (_norm(self.norm3, h), *new)


class _Step(nn.Module):
    """One decoding step over a fixed cache of ``max_len`` slots (see the module docstring)."""

    def __init__(self, net: Seq2SeqNet, max_len: int) -> None:
        super().__init__()
        self.embed, self.embed_scale, self.norm = net.embed, net.embed_scale, net.dec_norm
        self.vocab, self.max_len = net.vocab, max_len
        self.layers = nn.ModuleList(_StepLayer(layer) for layer in net.decoder)
        self.head = net.head
        self.register_buffer("positions", net.dec_positions[:max_len].detach().clone())

    def forward(
        self, token: Tensor, position: Tensor, self_mask: Tensor, cross_mask: Tensor, *kv: Tensor
    ) -> tuple[Tensor, ...]:
        selfs = 2 * sum(layer.self_attn is not None for layer in self.layers)
        past, cross = list(kv[:selfs]), list(kv[selfs:])
        x = _embed(self.embed, self.embed_scale, token, self.vocab)
        x = _norm(self.norm, x + position.reshape(-1, self.max_len) @ self.positions)
        new: list[Tensor] = []
        for layer in self.layers:
            mine = (past.pop(0), past.pop(0)) if layer.self_attn is not None else ()
            theirs = (cross.pop(0), cross.pop(0)) if layer.crossing else ()
            x, *kv_new = layer(x, self_mask, mine, theirs, cross_mask)
            new += kv_new
        return (self.head(x), *new)


def _names(prefix: str, layers: list[int]) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in layers for kind in ("k", "v")]


# --- export ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seq2SeqOnnx:
    """The two exported graphs and what a host needs to run them."""

    encoder: Path
    decoder: Path
    max_len: int  # self-attention cache slots: the longest translation
    src_len: int | None  # fixed source length, or None: any length
    vocab: int
    pad: int
    eos: int
    start: int
    one_hot: bool  # inputs are one-hot rows (student) or int64 ids (teacher)
    quantized: bool  # QDQ graphs

    def translator(self, threads: int = 1, optimize: bool = True) -> OnnxTranslator:
        return OnnxTranslator(
            self.encoder,
            self.decoder,
            self.pad,
            self.eos,
            self.start,
            self.vocab,
            self.max_len,
            threads=threads,
            optimize=optimize,
        )


def _token_example(net: Seq2SeqNet, one_hot: bool, shape: tuple[int, int]) -> Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, net.vocab, shape, generator=g)
    return torch.nn.functional.one_hot(ids, net.vocab).float() if one_hot else ids


def export_seq2seq(
    net: Seq2SeqNet,
    folder: str | Path,
    max_len: int,
    src_len: int | None = None,
    quantized: bool | None = None,
) -> Seq2SeqOnnx:
    """Write ``encoder.onnx`` and ``decoder_step.onnx`` for ``net`` into ``folder``.

    ``max_len``: cache slots (translations end by then). ``src_len``: the fixed source length
    a chip runs (the graphs then hold no shape arithmetic); None exports any length, for
    onnxruntime. ``quantized``: QDQ graphs from a fake-quantized net (None: whenever it has
    quantized layers; False: its float twin, quantizers off). The batch is always dynamic.
    """
    if not 1 <= max_len <= net.max_positions:
        raise ArchnetError(f"max_len {max_len} must be in [1, {net.max_positions}] (positions)")
    if src_len is not None and not 1 <= src_len <= net.max_positions:
        raise ArchnetError(f"src_len {src_len} must be in [1, {net.max_positions}] (positions)")
    fake = is_quantized(net)
    quantized = fake if quantized is None else quantized
    if quantized and not fake:
        raise ArchnetError("quantized=True needs a fake-quantized net (archnet.quant)")
    one_hot = isinstance(net.embed, OneHotEmbedding)
    if not one_hot and not isinstance(net.embed, nn.Embedding):
        raise ArchnetError(f"cannot export the embedding {type(net.embed).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    b, n = _EXAMPLE_BATCH, src_len or min(7, net.max_positions)
    crossing = [i for i, layer in enumerate(net.decoder) if _has(layer.cross_attn)]
    selfs = [i for i, layer in enumerate(net.decoder) if _has(layer.self_attn)]
    heads = [
        (net.decoder[i].cross_attn.heads, net.decoder[i].cross_attn.head_dim) for i in crossing
    ]
    self_heads = [
        (net.decoder[i].self_attn.heads, net.decoder[i].self_attn.head_dim) for i in selfs
    ]
    batch = {0: "batch"}
    src_axes = {0: "batch"} if src_len else {0: "batch", 1: "src_len"}
    mask_axes = {0: "batch"} if src_len else {0: "batch", 3: "src_len"}
    kv_axes = {0: "batch"} if src_len else {0: "batch", 2: "src_len"}
    cross_names = _names("cross", crossing)

    enc_args = (_token_example(net, one_hot, (b, n)), torch.zeros(b, 1, 1, n))
    enc_names = OnnxIO(
        inputs=("src", "src_mask"),
        outputs=tuple(cross_names),
        dynamic_axes={"src": src_axes, "src_mask": mask_axes} | dict.fromkeys(cross_names, kv_axes),
    )
    g = torch.Generator().manual_seed(1)
    past = [torch.randn(b, h, max_len, d, generator=g) for h, d in self_heads for _ in "kv"]
    cross = [torch.randn(b, h, n, d, generator=g) for h, d in heads for _ in "kv"]
    position = torch.zeros(b, 1, max_len)
    position[:, 0, 0] = 1.0
    step_args = (
        _token_example(net, one_hot, (b, 1)),
        position,
        torch.zeros(b, 1, 1, max_len + 1),
        torch.zeros(b, 1, 1, n),
        *past,
        *cross,
    )
    past_names, new_names = _names("past", selfs), _names("new", selfs)
    step_names = OnnxIO(
        inputs=("token", "position", "self_mask", "cross_mask", *past_names, *cross_names),
        outputs=("logits", *new_names),
        dynamic_axes={
            name: batch for name in ("token", "position", "self_mask", "logits", *past_names)
        }
        | {"cross_mask": mask_axes}
        | dict.fromkeys(cross_names, kv_axes)
        | dict.fromkeys(new_names, batch),
    )
    encoder, decoder = folder / ENCODER_FILE, folder / DECODER_FILE
    export = export_qdq if quantized else export_onnx
    float_twin = float_mode(net) if fake and not quantized else contextlib.nullcontext()
    with float_twin:
        export(_Encoder(net, src_len), path=encoder, args=enc_args, names=enc_names)
        export(_Step(net, max_len), path=decoder, args=step_args, names=step_names)
    return Seq2SeqOnnx(
        encoder=encoder,
        decoder=decoder,
        max_len=max_len,
        src_len=src_len,
        vocab=net.vocab,
        pad=net.pad,
        eos=net.eos,
        start=net.start,
        one_hot=one_hot,
        quantized=quantized,
    )


def check_seq2seq(exported: Seq2SeqOnnx, target: Target | str) -> dict[str, CheckReport]:
    """The target checker's report on each graph, keyed ``"encoder"`` and ``"decoder_step"``."""
    target = load_target(target) if isinstance(target, str) else target
    return {
        name: check_report(onnx.load(str(path)), target)
        for name, path in (("encoder", exported.encoder), ("decoder_step", exported.decoder))
    }


# --- greedy decoding on onnxruntime ---------------------------------------------------------------


class OnnxTranslator:
    """Greedy translation with the two exported graphs on onnxruntime, by
    :func:`archnet.seq2seq.decode.greedy`'s rules (start token, pad never produced, stop at
    eos, eos forced at the last of ``min(max_new, max_len)`` steps), so a correct export
    gives PyTorch's tokens. One-hot inputs, masks and the cache are kept on the host, as a
    chip's driver would.

    ``optimize=False`` runs the graphs as written: a QDQ graph then computes exactly the
    fake quantization. Optimised, onnxruntime (1.32) also rounds every float bias onto its
    int32 accumulator grid (input step x weight step), as an integer chip would; at 4 bits
    that grid is coarse and the logits move (by up to ~0.9 on the tests' tiny W4A4 student).
    """

    def __init__(
        self,
        encoder_path: str | Path,
        decoder_path: str | Path,
        pad: int,
        eos: int,
        start: int,
        vocab: int,
        max_len: int,
        threads: int = 1,
        optimize: bool = True,
    ) -> None:
        self.pad, self.eos, self.start, self.vocab, self.max_len = pad, eos, start, vocab, max_len
        self.encoder = ort_session(Path(encoder_path), threads=threads, optimize=optimize)
        self.decoder = ort_session(Path(decoder_path), threads=threads, optimize=optimize)
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        self._past = [name for name in inputs if name.startswith("past_")]
        self._cross = [o.name for o in self.encoder.get_outputs()]
        self.cache_shapes = [tuple(inputs[n].shape[1:]) for n in self._past[::2]]
        if any(shape[1] != max_len for shape in self.cache_shapes):
            raise ArchnetError(
                f"the decoder graph's cache has {self.cache_shapes[0][1]} slots, not {max_len}"
            )
        src = self.encoder.get_inputs()[0]
        self.one_hot = src.type == "tensor(float)"
        self.src_len = src.shape[1] if isinstance(src.shape[1], int) else None
        self._outputs = [o.name for o in self.decoder.get_outputs()]
        # an input no node reads (the mask of an encoder without attention) is not in the graph
        self._encoder_inputs = [i.name for i in self.encoder.get_inputs()]
        self._decoder_inputs = set(inputs)

    def _tokens(self, ids: np.ndarray) -> np.ndarray:
        if not self.one_hot:
            return ids.astype(np.int64)
        rows = np.zeros((ids.size, self.vocab), np.float32)  # not np.eye: vocab^2 floats a call
        rows[np.arange(ids.size), ids.reshape(-1)] = 1.0
        return rows.reshape(*ids.shape, self.vocab)

    def encode(self, src: Tensor | np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Cross-attention keys/values of every layer and the additive source mask, for
        ``src`` ids ``(B, S)`` padded with ``pad`` (padded further to a fixed graph's length)."""
        ids = np.asarray(src.cpu() if isinstance(src, Tensor) else src, dtype=np.int64)
        if self.src_len is not None:
            if ids.shape[1] > self.src_len:
                raise ArchnetError(
                    f"a source of {ids.shape[1]} tokens is longer than the encoder graph's "
                    f"fixed {self.src_len}; export with a larger src_len"
                )
            extra = np.full((len(ids), self.src_len - ids.shape[1]), self.pad, dtype=np.int64)
            ids = np.concatenate([ids, extra], 1)
        mask = np.where(ids == self.pad, np.float32(NEG), np.float32(0.0))[:, None, None, :]
        feed = {"src": self._tokens(ids), "src_mask": mask}
        cross = self.encoder.run(self._cross, {k: feed[k] for k in self._encoder_inputs})
        return cross, mask

    def new_cache(self, batch: int) -> list[np.ndarray]:
        """Zeroed self-attention caches, ``past_k_0, past_v_0, ...``."""
        return [np.zeros((batch, *shape), np.float32) for shape in self.cache_shapes for _ in "kv"]

    def step(
        self,
        tokens: np.ndarray,
        t: int,
        cache: list[np.ndarray],
        cross: list[np.ndarray],
        cross_mask: np.ndarray,
    ) -> np.ndarray:
        """Logits ``(B, vocab)`` for ``tokens`` ``(B,)`` at position ``t``; this step's keys
        and values are written into slot ``t`` of ``cache``."""
        b = len(tokens)
        position = np.zeros((b, 1, self.max_len), np.float32)
        position[:, 0, t] = 1.0
        self_mask = np.full((b, 1, 1, self.max_len + 1), np.float32(NEG))
        self_mask[..., :t] = 0.0
        self_mask[..., -1] = 0.0
        feed = {
            "token": self._tokens(np.asarray(tokens)[:, None]),
            "position": position,
            "self_mask": self_mask,
            "cross_mask": cross_mask,
        }
        feed |= dict(zip(self._past, cache))
        feed |= dict(zip(self._cross, cross))
        feed = {k: v for k, v in feed.items() if k in self._decoder_inputs}
        logits, *new = self.decoder.run(self._outputs, feed)
        for slots, value in zip(cache, new):
            slots[:, :, t : t + 1] = value
        return logits

    def _allowed(self, logits: np.ndarray, t: int, limit: int) -> np.ndarray:
        logits = logits.copy()
        logits[:, self.pad] = -np.inf
        if t == limit - 1:  # the last step may only end the sentence
            logits[:] = -np.inf
            logits[:, self.eos] = 0.0
        return logits

    def greedy(
        self, src: Tensor | np.ndarray, max_new: int = 160, *, fixed: bool = False
    ) -> list[list[int]]:
        """Token ids (eos included, start token excluded) for each row of padded ``src``.
        ``fixed``: run all ``min(max_new, max_len)`` steps, whatever is produced (a workload
        set by the architecture alone, for timing)."""
        cross, cross_mask = self.encode(src)
        b = len(cross_mask)
        cache = self.new_cache(b)
        tokens = np.full(b, self.start, dtype=np.int64)
        done = np.zeros(b, dtype=bool)
        out: list[list[int]] = [[] for _ in range(b)]
        limit = min(max_new, self.max_len)
        for t in range(limit):
            logits = self.step(tokens, t, cache, cross, cross_mask)
            nxt = self._allowed(logits, t, limit).argmax(-1)
            for i in np.flatnonzero(~done):
                out[i].append(int(nxt[i]))
            done |= nxt == self.eos
            if done.all() and not fixed:
                break
            tokens = np.where(done, self.pad, nxt)
        return out
