"""Latency of whole translations on onnxruntime, several models compared in one run.

A translation's time depends on the machine's state as much as on the model: on a shared CPU
two back-to-back timings of one model differ by 30% or more. So models are compared in
interleaved rounds (each round times every model once, the order rotating), and the ratio to
the first model is the median of the per-round ratios: a slow spell slows both sides of a
round. Greedy decoding stops when every sentence has ended, so a model that writes longer
outputs is slower for that reason too; ``fixed`` steps time the architecture alone.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from archnet.seq2seq.net import Seq2SeqNet
from archnet.seq2seq.onnx import OnnxTranslator, Seq2SeqOnnx, export_seq2seq

__all__ = ["TranslationLatency", "latency_sample", "time_translations"]

Model = OnnxTranslator | Seq2SeqOnnx | Seq2SeqNet


@dataclass(frozen=True)
class TranslationLatency:
    """Median milliseconds (onnxruntime CPU, after warm-up) of one encoder run at ``(batch,
    src_len)``, one decoder step over a ``max_len`` cache (every step costs the same: the
    cache has a fixed size), and the translation of the batch (``steps`` decoder steps);
    ``ratio``: the median over rounds of this model's translation time over the first
    model's in the same round."""

    encoder_ms: float
    step_ms: float
    translate_ms: float
    ratio: float
    batch: int
    src_len: int
    max_len: int
    steps: int


def _ms(fn: Callable[[], object]) -> float:
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_translations(
    models: Mapping[str, Model],
    src: Tensor,
    max_new: int = 160,
    rounds: int = 10,
    warmup: int = 2,
    threads: int = 1,
    max_len: int | None = None,
    fixed: bool = False,
) -> dict[str, TranslationLatency]:
    """Latency of translating the padded batch ``src`` with each model, in interleaved rounds
    (see the module docstring); ratios are to the first model. A net is first exported at a
    fixed source length (``src``'s width) with ``max_len`` cache slots (default ``min(max_new,
    positions)``) into a temporary folder; a translator is timed as it was built. ``fixed``:
    every translation runs ``min(max_new, max_len)`` steps (no early stop)."""
    with contextlib.ExitStack() as stack:
        translators = {}
        for label, model in models.items():
            if isinstance(model, Seq2SeqNet):
                limit = max_len or min(max_new, model.max_positions)
                tmp = stack.enter_context(tempfile.TemporaryDirectory())
                model = export_seq2seq(model, tmp, limit, src_len=src.shape[1])
            if isinstance(model, Seq2SeqOnnx):
                model = model.translator(threads=threads)
            translators[label] = model
        return _rounds(translators, src, max_new, max(rounds, 1), warmup, fixed)


def _rounds(
    translators: dict[str, OnnxTranslator],
    src: Tensor,
    max_new: int,
    rounds: int,
    warmup: int,
    fixed: bool,
) -> dict[str, TranslationLatency]:
    labels = list(translators)
    work: dict[str, dict[str, Callable[[], object]]] = {}
    steps: dict[str, int] = {}
    for label, tr in translators.items():
        cross, mask = tr.encode(src)
        cache, tokens = tr.new_cache(len(mask)), np.full(len(mask), tr.start, dtype=np.int64)
        produced = max(len(row) for row in tr.greedy(src, max_new, fixed=fixed))
        steps[label] = min(max_new, tr.max_len) if fixed else produced
        work[label] = {
            "encoder": lambda tr=tr: tr.encode(src),
            "step": lambda tr=tr, c=cache, t=tokens, x=cross, m=mask: tr.step(t, 0, c, x, m),
            "translate": lambda tr=tr: tr.greedy(src, max_new, fixed=fixed),
        }
    for label in labels:
        for fn in work[label].values():
            for _ in range(warmup):
                fn()
    times = {label: {part: [] for part in work[label]} for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            for part, fn in work[label].items():
                times[label][part].append(_ms(fn))
    first = times[labels[0]]["translate"]
    out = {}
    for label, tr in translators.items():
        t = times[label]
        out[label] = TranslationLatency(
            encoder_ms=statistics.median(t["encoder"]),
            step_ms=statistics.median(t["step"]),
            translate_ms=statistics.median(t["translate"]),
            ratio=statistics.median(a / b for a, b in zip(t["translate"], first)),
            batch=len(src),
            src_len=tr.src_len or src.shape[1],
            max_len=tr.max_len,
            steps=steps[label],
        )
    return out


def latency_sample(sources: list[list[int]], n: int) -> list[int]:
    """Indices of the ``n`` sentences from the median length up: a typical batch to time."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    return order[len(order) // 2 :][:n]
