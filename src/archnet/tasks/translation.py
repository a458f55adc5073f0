"""Translation: next-token logits over real tokens, token-level KD, BLEU and chrF.

An encoder-decoder's output is a distribution per target position, and padding positions are
not outputs: :class:`TokenLogits` carries the logits with the real-token mask, and every loss
is a mean over real tokens. What a user reads is text: BLEU and chrF of detokenized
translations against references (sacrebleu), and how often a student says what its teacher
says. Conversions run through :mod:`archnet.seq2seq` (``convert --task translation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from archnet.distill.losses import kd_kl
from archnet.tasks.base import Task, register_task

__all__ = ["TokenLogits", "Translation"]


class TokenLogits(NamedTuple):
    """``logits`` (B, T, vocab) of the next token after each decoder input; ``keep`` (B, T)
    True where that position is a real token."""

    logits: torch.Tensor
    keep: torch.Tensor


@register_task("translation")
class Translation(Task):
    """Label-free translation distillation: token KL to the teacher's distributions on the
    teacher's own translations; scored by BLEU and chrF on a held-out split."""

    def distill_loss(
        self, student_out: TokenLogits, teacher_out: TokenLogits, temperature: float = 1.0
    ) -> torch.Tensor:
        keep = teacher_out.keep
        return kd_kl(student_out.logits[keep], teacher_out.logits[keep], temperature)

    def metrics(self, outputs: Sequence[str], targets: Sequence[str]) -> dict:
        """Corpus BLEU and chrF (sacrebleu defaults) with their signatures."""
        from archnet.zoo.tiny_mt import bleu_chrf

        return bleu_chrf(outputs, targets)

    def agreement(self, student_out: Sequence[str], teacher_out: Sequence[str]) -> dict:
        """``same_text``: share (%) of sentences translated exactly as the teacher does."""
        same = sum(a == b for a, b in zip(student_out, teacher_out))
        return {"same_text": 100.0 * same / max(len(teacher_out), 1)}
