"""Label-free translation data: source sentences and the teacher's own translations of them.

A conversion never reads reference translations for training: the student is taught, token by
token, what the teacher says (teacher forcing on the teacher's greedy output). At each position
the teacher's argmax *is* the next token of its greedy translation, so cross-entropy on these
tokens is Arch-Net's "cross-entropy on the teacher's argmax tokens". References are read only
to score BLEU/chrF on the held-out books.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from archnet.seq2seq.decode import greedy, pad_batch
from archnet.seq2seq.net import Seq2SeqNet
from archnet.zoo.tiny_mt import encode, length_batches

__all__ = ["Batch", "TokenPairs", "by_length", "encode", "make_batches", "stream", "teacher_pairs"]


@dataclass
class TokenPairs:
    """Source ids and the teacher's greedy output ids (</s> included), one pair per sentence."""

    src: list[list[int]]
    out: list[list[int]]

    def __len__(self) -> int:
        return len(self.src)

    def to_dict(self) -> dict:
        return {"src": self.src, "out": self.out}

    @classmethod
    def from_dict(cls, d: dict) -> TokenPairs:
        return cls(d["src"], d["out"])


@dataclass
class Batch:
    """One teacher-forced batch: ``src`` and ``dec_in`` (the start token, then the teacher's
    tokens) padded with pad; ``labels`` the teacher's tokens; ``keep`` True on real labels."""

    src: Tensor
    dec_in: Tensor
    labels: Tensor
    keep: Tensor

    @property
    def tokens(self) -> int:
        return int(self.keep.sum())


def by_length(
    src: list[list[int]],
    translate: Callable[[Tensor], list[list[int]]],
    pad: int,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """``translate`` (padded source ids -> output ids per row) over batches of similar length
    (little padding), the outputs returned in input order."""
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    out: list[list[int]] = [[] for _ in src]
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        for i, tokens in zip(chunk, translate(pad_batch([src[i] for i in chunk], pad))):
            out[i] = tokens
        if progress is not None:
            progress(min(k + batch_size, len(src)), len(src))
    return out


@torch.no_grad()
def teacher_pairs(
    teacher: Seq2SeqNet,
    src: list[list[int]],
    max_new: int,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> TokenPairs:
    """The teacher's greedy translation of every source (batches of similar length)."""
    out = by_length(src, lambda b: greedy(teacher, b, max_new), teacher.pad, batch_size, progress)
    return TokenPairs(src, out)


def make_batches(pairs: TokenPairs, net: Seq2SeqNet, batch_tokens: int, seed: int) -> list[Batch]:
    """Length-bucketed batches of at most ``batch_tokens`` padded tokens a side, shuffled."""
    lengths = [max(len(a), len(b)) for a, b in zip(pairs.src, pairs.out)]
    batches = []
    for idx in length_batches(lengths, batch_tokens, seed):
        outs = [pairs.out[i] for i in idx]
        labels = pad_batch(outs, net.pad)
        keep = torch.zeros_like(labels, dtype=torch.bool)
        for row, o in enumerate(outs):
            keep[row, : len(o)] = True
        dec_in = pad_batch([[net.start, *o[:-1]] for o in outs], net.pad)
        batches.append(Batch(pad_batch([pairs.src[i] for i in idx], net.pad), dec_in, labels, keep))
    return batches


def stream(pairs: TokenPairs, net: Seq2SeqNet, batch_tokens: int, seed: int) -> Iterator[Batch]:
    """Batches forever, a new length bucketing and order each epoch."""
    epoch = 0
    while True:
        batches = make_batches(pairs, net, batch_tokens, seed * 1000 + epoch)
        random.Random(seed + epoch).shuffle(batches)
        yield from batches
        epoch += 1
