"""Latency (and MACs) of HANT candidates as parts of one whole translation.

A translation runs the encoder once and the decoder once per output token, so every part is
timed where it runs: an encoder layer at ``(1, src_len)`` tokens (all real: its mask and
``keep`` are constants of the graph); a decoder layer as one decoding step, a single token
attending a cache of ``cache_len`` slots plus itself and ``src_len`` source tokens, with the
cross-attention keys/values it computes once per sentence timed apart; and, once, the parts
outside the layers (embeddings, output layer). Each group of a block's candidates is timed
interleaved with an empty graph on the same backend (onnxruntime, CPU, one thread by default)
and the empty graph's time, the per-call floor, is subtracted from each layer; the fixed
parts keep it, as each whole graph call pays it once. The combination,

    predicted = encoder_fixed + sum(encoder layers)
                + T * (step_fixed + sum(decoder steps)) + sum(decoder cross k/v)

is a *prediction* (a sum of measured parts); the caller measures whole translations.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from archnet.flops import count_macs
from archnet.seq2seq.candidates import CandidatePool, NoAttention
from archnet.seq2seq.data import Batch
from archnet.seq2seq.net import Seq2SeqNet
from archnet.targets.latency import LatencyBackend, LatencyCache, measure_cached_group

__all__ = ["LatencyParts", "mean_output_tokens", "measure_latency"]

Progress = Callable[[int, int], None]


class _EncoderCall(nn.Module):
    """An encoder layer run on ``(B, n, d)`` with all tokens real (mask and keep constant)."""

    def __init__(self, layer: nn.Module, n: int, batch: int = 1) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("mask", torch.zeros(batch, 1, 1, n))
        self.register_buffer("keep", torch.ones(batch, n, dtype=torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, self.mask, self.keep)[0]


class _DecoderStep(nn.Module):
    """A decoder layer's work for one token ``(1, 1, d)``: self-attention over a cache of
    ``cache_len`` slots plus the new one, cross-attention over ``src_len`` source keys/values
    (constants here: they are computed once per sentence, timed by :class:`_CrossKV`)."""

    def __init__(
        self, layer: nn.Module, width: int, src_len: int, cache_len: int, batch: int = 1
    ) -> None:
        super().__init__()
        self.layer = layer
        g = torch.Generator().manual_seed(0)
        memory = torch.randn(batch, src_len, width, generator=g)
        with torch.no_grad():
            k, v = layer.cross_attn.memory_kv(memory)
        self.register_buffer("cross_k", k.clone())
        self.register_buffer("cross_v", v.clone())
        self.register_buffer("cross_mask", torch.zeros(batch, 1, 1, src_len))
        attn = layer.self_attn
        self.cached = attn is not None
        if self.cached:
            shape = (batch, attn.heads, cache_len, attn.head_dim)
            self.register_buffer("past_k", torch.randn(*shape, generator=g))
            self.register_buffer("past_v", torch.randn(*shape, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        past = (self.past_k, self.past_v) if self.cached else None
        kv = (self.cross_k, self.cross_v)
        return self.layer(x, None, kv, self.cross_mask, None, past)[0]


class _CrossKV(nn.Module):
    """A decoder layer's cross-attention keys and values of ``(1, src_len, d)`` encoder output."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.attn = layer.cross_attn

    def forward(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        return self.attn.memory_kv(memory)


class _Fixed(nn.Module):
    """The parts outside the layers: token embedding (+ positions, norm) of ``n`` tokens and,
    with ``head``, the output layer of the last one (a decoding step). The timing input is a
    float tensor ``(1, n)`` cast to token ids, so nothing is folded into a constant."""

    def __init__(self, net: Seq2SeqNet, decoder: bool, n: int) -> None:
        super().__init__()
        self.embed = copy.deepcopy(net.embed)
        self.scale, self.vocab = float(net.embed_scale), net.vocab
        table = net.dec_positions if decoder else net.positions
        self.register_buffer("positions", table[:n].clone())
        self.norm = copy.deepcopy(net.dec_norm if decoder else net.enc_norm)
        self.head = copy.deepcopy(net.head) if decoder else None

    def forward(self, x: Tensor) -> Tensor:
        ids = x.abs().long().clamp(max=self.vocab - 1)
        h = self.embed(ids) * self.scale + self.positions
        if self.norm is not None:
            h = self.norm(h)
        return h if self.head is None else self.head(h)[:, -1]


@dataclass
class LatencyParts:
    """Measured parts of a translation's latency (ms, above the per-call floor for the
    layers; with it for the fixed parts, which each whole graph call pays once), and MACs.

    Per block and candidate: ``per_call`` is an encoder layer at ``(1, src_len)`` or one
    decoder step, ``per_sentence`` a decoder layer's cross-attention keys/values of the
    source (0 for encoder layers). Combine with :meth:`layer_ms` / :meth:`fixed_ms`."""

    blocks: list[str]
    per_call: list[dict[str, float]]
    per_sentence: list[dict[str, float]]
    encoder_fixed_ms: float
    step_fixed_ms: float
    macs_per_call: list[dict[str, int]]
    macs_per_sentence: list[dict[str, int]]
    encoder_fixed_macs: int
    step_fixed_macs: int
    src_len: int
    cache_len: int
    floors_ms: dict[str, float]
    platform: str

    def _decoder(self, b: int) -> bool:
        return self.blocks[b].startswith("decoder.")

    def layer_ms(self, out_tokens: float) -> list[dict[str, float]]:
        """Per block and candidate, ms of one translation of ``out_tokens`` output tokens."""
        return [
            {
                k: (out_tokens * v + self.per_sentence[b][k]) if self._decoder(b) else v
                for k, v in per.items()
            }
            for b, per in enumerate(self.per_call)
        ]

    def layer_macs(self, out_tokens: float) -> list[dict[str, float]]:
        return [
            {
                k: float(out_tokens * v + self.macs_per_sentence[b][k])
                if self._decoder(b)
                else float(v)
                for k, v in per.items()
            }
            for b, per in enumerate(self.macs_per_call)
        ]

    def fixed_ms(self, out_tokens: float) -> float:
        """Embeddings and output layer of one translation: ``encoder_fixed + T * step_fixed``."""
        return self.encoder_fixed_ms + out_tokens * self.step_fixed_ms

    def predict_ms(self, names: Sequence[str], out_tokens: float) -> float:
        """Predicted (sum of measured parts) ms of one translation with candidate ``names``."""
        per = self.layer_ms(out_tokens)
        return self.fixed_ms(out_tokens) + sum(p[n] for p, n in zip(per, names, strict=True))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyParts:
        return cls(**d)


def measure_latency(
    teacher: Seq2SeqNet,
    pool: CandidatePool,
    backend: LatencyBackend | None = None,
    src_len: int = 32,
    cache_len: int = 32,
    warmup: int = 10,
    repeats: int = 50,
    rounds: int = 5,
    cache: LatencyCache | None = None,
    progress: Progress | None = None,
    batch: int = 1,
) -> LatencyParts:
    """Time every candidate (median after warm-up, interleaved with its block's other
    candidates and an empty graph whose time, the per-call floor, is subtracted).

    ``backend`` defaults to onnxruntime on the CPU with one thread; ``cache`` (a
    :class:`~archnet.targets.LatencyCache`, in memory by default) keeps timings across runs.
    ``src_len`` is the source length timed (the deployed encoder's fixed length, or a typical
    one); ``cache_len`` the self-attention cache a step attends: the deployed step graph's
    ``max_len`` when it attends a fixed cache every step (as :mod:`archnet.seq2seq.onnx`
    does), else about half the mean output length. ``batch``: sentences translated together,
    as the deployment (and the whole-translation measurement) runs them: at a larger batch
    the attention over the cache weighs more against the weight matrices. MACs stay per
    sentence.
    """
    if backend is None:
        from archnet.targets.latency import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend("cpu", threads=1)
    cache = cache if cache is not None else LatencyCache(":memory:")
    width = teacher.embed.embedding_dim
    kw = {"warmup": warmup, "repeats": repeats}
    floors: dict[str, float] = {}

    def timed(modules: dict[str, nn.Module], shape: tuple[int, ...], whole: bool = False):
        group = measure_cached_group(backend, cache, modules, shape, rounds, **kw)
        floors["x".join(map(str, shape))] = group.floor_ms
        return group.measured_ms if whole else group.ms

    def macs(module: nn.Module, shape: tuple[int, ...]) -> int:
        return int(count_macs(module, shape[1:]))

    per_call, per_sentence, macs_call, macs_sentence = [], [], [], []
    total = len(pool.blocks) + 1
    for b, (block, per) in enumerate(zip(pool.blocks, pool.modules)):
        if block.startswith("decoder."):
            steps = {
                k: _DecoderStep(m, width, src_len, cache_len, batch).eval() for k, m in per.items()
            }
            ones = {k: _DecoderStep(m, width, src_len, cache_len).eval() for k, m in per.items()}
            kvs = {k: _CrossKV(m).eval() for k, m in per.items()}
            real = {k: m for k, m in kvs.items() if not isinstance(m.attn, NoAttention)}
            step_shape, kv_shape = (1, 1, width), (1, src_len, width)
            per_call.append(timed(steps, (batch, 1, width)))
            measured = timed(real, (batch, src_len, width)) if real else {}
            per_sentence.append({k: float(measured.get(k, 0.0)) for k in per})
            macs_call.append({k: macs(m, step_shape) for k, m in ones.items()})
            macs_sentence.append({k: macs(m, kv_shape) if k in real else 0 for k, m in kvs.items()})
        else:
            calls = {k: _EncoderCall(m, src_len, batch).eval() for k, m in per.items()}
            shape = (1, src_len, width)
            per_call.append(timed(calls, (batch, src_len, width)))
            per_sentence.append(dict.fromkeys(per, 0.0))
            macs_call.append(
                {k: macs(_EncoderCall(m, src_len).eval(), shape) for k, m in per.items()}
            )
            macs_sentence.append(dict.fromkeys(per, 0))
        if progress is not None:
            progress(b + 1, total)
    enc_fixed = _Fixed(teacher, decoder=False, n=src_len).eval()
    step_fixed = _Fixed(teacher, decoder=True, n=1).eval()
    enc_ms = timed({"encoder_fixed": enc_fixed}, (batch, src_len), whole=True)["encoder_fixed"]
    step_ms = timed({"step_fixed": step_fixed}, (batch, 1), whole=True)["step_fixed"]
    if progress is not None:
        progress(total, total)
    return LatencyParts(
        blocks=list(pool.blocks),
        per_call=per_call,
        per_sentence=per_sentence,
        encoder_fixed_ms=float(enc_ms),
        step_fixed_ms=float(step_ms),
        macs_per_call=macs_call,
        macs_per_sentence=macs_sentence,
        encoder_fixed_macs=macs(enc_fixed, (1, src_len)),
        step_fixed_macs=macs(step_fixed, (1, 1)),
        src_len=src_len,
        cache_len=cache_len,
        floors_ms=floors,
        platform=backend.cache_key().platform,
    )


def mean_output_tokens(batches: Sequence[Batch]) -> float:
    """Mean number of output tokens (</s> included) per sentence: ``T`` of the latency model."""
    lengths = torch.cat([b.keep.sum(1) for b in batches]).float()
    return float(lengths.mean())
