"""HANT / Puzzle for encoder-decoder Transformers: one candidate per layer under a latency budget.

For every encoder and decoder layer of a :class:`~archnet.seq2seq.net.Seq2SeqNet` teacher:

1. :func:`train_candidates` trains the candidates of :mod:`archnet.seq2seq.candidates` by
   blockwise feature distillation: each takes the teacher layer's input, with the masks and
   context the layer is called with (the encoder output for a decoder layer's
   cross-attention, from which a candidate computes its own keys and values), and regresses
   the teacher layer's output (normalized MSE over real tokens).
2. :func:`replace_one_scores` swaps one candidate into the teacher at a time and measures the
   token-level KL between the teacher's and the swapped model's next-token distributions on
   held-out batches (Puzzle's replace-one-block score).
3. :func:`measure_latency` times every candidate with onnxruntime (CPU, 1 thread by default):
   an encoder layer at ``(1, src_len)`` tokens, a decoder layer as one decoding step (one
   token attending a cache of ``cache_len`` slots and ``src_len`` source tokens) plus its
   once-per-sentence cross-attention keys/values, and the fixed parts once.
4. :func:`search_table` combines them into the ILP's :class:`~archnet.search.SearchTable`
   with the translation latency model (all in ms of one whole translation)::

       predicted = encoder_fixed + sum(encoder layers)
                   + T * (step_fixed + sum(decoder layer steps)) + sum(decoder cross k/v)

   where ``T`` is the mean number of output tokens. These totals are *predicted* (a sum of
   separately measured parts); the whole translation is measured by the caller.
5. :func:`assemble` builds the student, :func:`finetune` distils it end to end (token KL to
   the teacher's logits + cross-entropy on the teacher's tokens, masked to real tokens).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archnet.errors import ArchnetError
from archnet.flops import count_params
from archnet.search import SearchTable
from archnet.seq2seq.candidates import (
    UNTRAINED,
    CandidatePool,
    block_names,
    build_candidate,
    build_pool,
    is_decoder_layer,
)
from archnet.seq2seq.data import Batch
from archnet.seq2seq.distill import masked_nmse, token_kl
from archnet.seq2seq.layer_latency import LatencyParts, mean_output_tokens, measure_latency
from archnet.seq2seq.net import Seq2SeqNet

__all__ = [
    "LATENCY",
    "CandidatePool",
    "LatencyParts",
    "assemble",
    "block_names",
    "blockwise_losses",
    "build_pool",
    "finetune",
    "kd_loss",
    "mean_output_tokens",
    "measure_latency",
    "replace_one_scores",
    "search_table",
    "teacher_choice",
    "token_kl",
    "train_candidates",
]

LATENCY = "latency_ms"
"""Name of the latency cost in the search table (ms of one whole translation, predicted)."""

Progress = Callable[[int, int], None]


# --- blockwise distillation ---------------------------------------------------------------------


@dataclass
class _LayerIO:
    """What one teacher layer saw and answered on one batch: ``inputs`` the positional
    arguments it was called with (the stream first), ``out`` its stream output, ``keep``
    its real tokens."""

    inputs: tuple[Any, ...]
    out: Tensor
    keep: Tensor


@torch.no_grad()
def _capture(teacher: Seq2SeqNet, batch: Batch) -> tuple[list[_LayerIO], Tensor]:
    """Every layer's inputs and output on ``batch`` (teacher forcing), and the encoder output."""
    io: list[_LayerIO] = []

    def hook(module: nn.Module, args: tuple, output: tuple) -> None:
        keep = args[4] if is_decoder_layer(module) else args[2]
        io.append(_LayerIO(args, output[0], keep))

    handles = [layer.register_forward_hook(hook) for layer in (*teacher.encoder, *teacher.decoder)]
    try:
        src_keep, tgt_keep = teacher.keeps(batch.src, batch.dec_in)
        memory = teacher.encode(batch.src, src_keep)
        teacher.decode(batch.dec_in, memory, src_keep, tgt_keep)
    finally:
        for h in handles:
            h.remove()
    return io, memory


def _call(module: nn.Module, io: _LayerIO, memory: Tensor) -> Tensor:
    """``module`` in place of the teacher layer of ``io``: a decoder layer computes its own
    cross-attention keys and values from the encoder output."""
    if is_decoder_layer(module):
        x, self_mask, _, cross_mask, keep = io.inputs[:5]
        kv = module.cross_attn.memory_kv(memory)
        return module(x, self_mask, kv, cross_mask, keep)[0]
    return module(*io.inputs)[0]


@torch.no_grad()
def blockwise_losses(
    teacher: Seq2SeqNet, pool: CandidatePool, batches: Sequence[Batch]
) -> list[dict[str, float]]:
    """Mean masked normalized MSE of every candidate to its teacher layer's output."""
    sums = [dict.fromkeys(per, 0.0) for per in pool.modules]
    for batch in batches:
        io, memory = _capture(teacher, batch)
        for b, per in enumerate(pool.modules):
            for name, module in per.items():
                was = module.training
                module.eval()
                sums[b][name] += float(
                    masked_nmse(_call(module, io[b], memory), io[b].out, io[b].keep)
                )
                module.train(was)
    n = max(len(batches), 1)
    return [{k: v / n for k, v in per.items()} for per in sums]


def _order(n: int, seed: int) -> Iterator[int]:
    """Batch indices forever, a new seeded shuffle each epoch."""
    epoch = 0
    while True:
        idx = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(idx)
        yield from idx
        epoch += 1


def train_candidates(
    teacher: Seq2SeqNet,
    batches: Sequence[Batch],
    names: Sequence[str] | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
    eval_batches: int = 4,
) -> CandidatePool:
    """Train every candidate of every layer on the teacher layer's own inputs.

    Each step runs the teacher once on one teacher-forced batch (capturing every layer's
    input, masks and output) and gives every trainable candidate of every layer one Adam step
    on its masked normalized MSE. ``keep`` and ``skip`` are not trained. The pool's
    ``start_loss`` / ``final_loss`` are measured on the first ``eval_batches`` batches before
    and after training. Deterministic for a given ``seed`` (batch order; no other randomness).
    """
    if not batches:
        raise ArchnetError("blockwise training needs at least one batch")
    torch.manual_seed(seed)
    teacher.eval()
    pool = build_pool(teacher, names)
    held = list(batches[:eval_batches])
    pool.start_loss = blockwise_losses(teacher, pool, held)
    trainable = [
        (b, module, torch.optim.Adam(module.parameters(), lr=lr))
        for b, per in enumerate(pool.modules)
        for name, module in per.items()
        if name not in UNTRAINED and list(module.parameters())
    ]
    for _, module, _ in trainable:
        module.train()
    order = _order(len(batches), seed)
    for step in range(steps):
        io, memory = _capture(teacher, batches[next(order)])
        for b, module, opt in trainable:
            opt.zero_grad(set_to_none=True)
            masked_nmse(_call(module, io[b], memory), io[b].out, io[b].keep).backward()
            opt.step()
        if progress is not None:
            progress(step + 1, steps)
    for _, module, _ in trainable:
        module.eval()
    pool.final_loss = blockwise_losses(teacher, pool, held)
    return pool


# --- replace-one scores -------------------------------------------------------------------------


@contextlib.contextmanager
def _swapped(net: Seq2SeqNet, block: str, module: nn.Module) -> Iterator[Seq2SeqNet]:
    """``net`` with the layer ``block`` replaced by ``module`` (restored afterwards)."""
    side, index = block.split(".")
    layers = getattr(net, side)
    original = layers[int(index)]
    layers[int(index)] = module
    try:
        yield net
    finally:
        layers[int(index)] = original


@torch.no_grad()
def replace_one_scores(
    teacher: Seq2SeqNet,
    pool: CandidatePool,
    selection: Sequence[Batch],
    progress: Progress | None = None,
) -> list[dict[str, float]]:
    """Per block and candidate: the token-level KL between the teacher and the teacher with
    only that block replaced by the candidate, averaged over the real tokens of
    ``selection`` (batches held out from training). ``keep`` scores ~0."""
    teacher.eval()
    sums = [dict.fromkeys(per, 0.0) for per in pool.modules]
    tokens = 0
    total, done = len(selection) * sum(len(p) for p in pool.modules), 0
    for batch in selection:
        n = int(batch.keep.sum())
        tokens += n
        ref = teacher(batch.src, batch.dec_in)
        for b, per in enumerate(pool.modules):
            for name, module in per.items():
                with _swapped(teacher, pool.blocks[b], module.eval()) as net:
                    logits = net(batch.src, batch.dec_in)
                sums[b][name] += float(token_kl(logits, ref, batch.keep)) * n
                done += 1
                if progress is not None:
                    progress(done, total)
    return [{k: v / max(tokens, 1) for k, v in per.items()} for per in sums]


def search_table(
    teacher: Seq2SeqNet,
    pool: CandidatePool,
    scores: Sequence[dict[str, float]],
    parts: LatencyParts,
    out_tokens: float,
) -> SearchTable:
    """The ILP's table: replace-one scores, and per-translation costs ``latency_ms``
    (predicted from the measured parts, see :class:`LatencyParts`), ``macs`` and ``params``,
    each with the parts outside the layers as its offset, so budgets and totals are for the
    whole translation (whole network for ``params``)."""
    names = pool.names
    ms, mac = parts.layer_ms(out_tokens), parts.layer_macs(out_tokens)
    params = [{k: float(count_params(m)) for k, m in per.items()} for per in pool.modules]
    outside = count_params(teacher) - sum(
        count_params(teacher.get_submodule(b)) for b in pool.blocks
    )

    def rows(values: Sequence[dict[str, float]]) -> list[np.ndarray]:
        return [np.array([v[n] for n in ns], dtype=float) for v, ns in zip(values, names)]

    return SearchTable(
        blocks=list(pool.blocks),
        candidates=names,
        score=rows(scores),
        costs={LATENCY: rows(ms), "macs": rows(mac), "params": rows(params)},
        offsets={
            LATENCY: parts.fixed_ms(out_tokens),
            "macs": float(parts.encoder_fixed_macs + out_tokens * parts.step_fixed_macs),
            "params": float(outside),
        },
    )


def teacher_choice(table: SearchTable) -> list[int]:
    """The choice that keeps every teacher layer."""
    return [pool.index("keep") for pool in table.candidates]


# --- student ------------------------------------------------------------------------------------


def assemble(
    teacher: Seq2SeqNet, choice: Sequence[str], pool: CandidatePool | None = None
) -> Seq2SeqNet:
    """A deep copy of ``teacher`` with each layer replaced by the named candidate (in
    :func:`block_names` order), the trained one from ``pool`` when given, else freshly cut."""
    blocks = block_names(teacher)
    if len(choice) != len(blocks):
        raise ArchnetError(f"choice names {len(choice)} candidates; the teacher has {len(blocks)}")
    student = copy.deepcopy(teacher)
    for block, name in zip(blocks, choice):
        if pool is not None:
            module = copy.deepcopy(pool.modules[pool.blocks.index(block)][name])
        else:
            module = build_candidate(name, teacher.get_submodule(block))
            if module is None:
                raise ArchnetError(f"candidate {name!r} does not apply to {block}")
        side, index = block.split(".")
        getattr(student, side)[int(index)] = module
    return student.eval()


def kd_loss(
    student: Tensor, teacher: Tensor, batch: Batch, t: float = 1.0, ce_weight: float = 1.0
) -> Tensor:
    """The fine-tune objective: token KL to the teacher's logits plus ``ce_weight`` x
    cross-entropy on the teacher's tokens (``batch.labels``), both over real tokens."""
    loss = token_kl(student, teacher, batch.keep, t)
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student[batch.keep], batch.labels[batch.keep])
    return loss


def finetune(
    student: Seq2SeqNet,
    teacher: Seq2SeqNet,
    batches: Sequence[Batch],
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    progress: Progress | None = None,
) -> list[float]:
    """End-to-end distillation of ``student`` (in place): token-level KL to the teacher's
    logits plus ``ce_weight`` x cross-entropy on the teacher's tokens, both over real tokens.
    Adam; batches in a seeded order. Returns the loss of every step."""
    if not batches:
        raise ArchnetError("fine-tuning needs at least one batch")
    torch.manual_seed(seed)
    teacher.eval()
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    order = _order(len(batches), seed)
    history = []
    for step in range(steps):
        batch = batches[next(order)]
        with torch.no_grad():
            ref = teacher(batch.src, batch.dec_in)
        loss = kd_loss(student(batch.src, batch.dec_in), ref, batch, temperature, ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps)
    student.eval()
    return history
