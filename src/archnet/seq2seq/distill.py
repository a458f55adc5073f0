"""Arch-Distillation of an encoder-decoder (Arch-Net's Transformer recipe), label-free.

The restricted student runs forward on its own outputs, teacher-forced on the teacher's own
translations. Distillation targets are added in schedule order (the encoder input, each encoder
layer, the decoder input, each decoder layer: :class:`~archnet.seq2seq.net.Taps`), the newest
with weight 1 and each earlier one decayed by 0.8 per stage: hidden states by normalized MSE
(real tokens only), attention maps (encoder self; decoder self and cross) by cosine distance of
each query's row. Residual Feature Adaptation (a d -> d/16 -> d/16 -> d linear adapter plus its
input, zero-initialised) sits between each student hidden state and its loss, absorbing what
the restricted layer cannot copy; it is training-only and dropped afterwards. The final stage
keeps every target and adds cross-entropy on the teacher's argmax tokens (label-smoothed) and
the token-level KL to the teacher's distributions.

Quantized students go through the same loop: fake-quantized from the float student, they are
trained with the final stage's losses.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archnet.distill.aids import TokenAdapter
from archnet.distill.archnet import progressive_weights
from archnet.seq2seq.data import Batch
from archnet.seq2seq.net import Seq2SeqNet, Taps
from archnet.tasks import TokenLogits, get_task

_TASK = get_task("translation")

__all__ = [
    "Seq2SeqDistillConfig",
    "attention_distance",
    "distill_seq2seq",
    "masked_nmse",
    "token_kl",
]


@dataclass
class Seq2SeqDistillConfig:
    """Schedule of one Arch-Distillation run; ``stage_steps`` per progressive stage (one per
    target), ``final_steps`` for the final stage."""

    stage_steps: int = 75
    final_steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    decay: float = 0.8
    attention_weight: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    label_smoothing: float = 0.1
    temperature: float = 1.0
    residual_adaptation: bool = True
    progressive: bool = True
    batch_tokens: int = 1024
    warmup: int = 50

    def to_dict(self) -> dict:
        return asdict(self)


def masked_nmse(s: Tensor, t: Tensor, keep: Tensor) -> Tensor:
    """||s - t||^2 / ||t||^2 over the real tokens of the batch (``keep``: (B, N))."""
    s, t = s[keep], t[keep]
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-8)


def attention_distance(s: Tensor, t: Tensor, rows: Tensor) -> Tensor:
    """Mean 1 - cosine similarity of each real query's attention row ``(B, H, Q, K)``;
    ``rows`` (B, Q) marks the real queries."""
    cos = F.cosine_similarity(s, t, dim=-1)  # (B, H, Q)
    weight = rows[:, None, :].expand_as(cos).float()
    return ((1 - cos) * weight).sum() / weight.sum().clamp_min(1.0)


def token_kl(student: Tensor, teacher: Tensor, keep: Tensor, t: float = 1.0) -> Tensor:
    """Mean KL(teacher || student) of the next-token distributions over real tokens (x t^2):
    the translation task's distillation loss."""
    return _TASK.distill_loss(TokenLogits(student, keep), TokenLogits(teacher, keep), t)


class _Losses:
    """The per-tap feature losses of one batch, given teacher and student taps."""

    def __init__(
        self, teacher_taps: Taps, student_taps: Taps, adapters: nn.ModuleList | None, n_enc: int
    ):
        self.t, self.s, self.adapters, self.n_enc = teacher_taps, student_taps, adapters, n_enc

    def tap(self, k: int, batch: Batch, src_keep: Tensor, cfg: Seq2SeqDistillConfig) -> Tensor:
        keep = src_keep if k <= self.n_enc else batch.keep
        s = self.s.hidden[k]
        if self.adapters is not None:
            s = self.adapters[k](s)
        loss = masked_nmse(s, self.t.hidden[k], keep)
        maps = list(zip(self.s.attention[k], self.t.attention[k]))
        if maps and cfg.attention_weight:
            loss = loss + cfg.attention_weight * sum(
                attention_distance(a, b, keep) for a, b in maps
            ) / len(maps)
        return loss


@torch.no_grad()
def _exact_taps(student: Seq2SeqNet, teacher: Seq2SeqNet, batch: Batch) -> set[int]:
    """The targets the restricted copy already meets exactly (the embeddings: one-hot x fully
    connected is exact): a progressive stage for them would train nothing."""
    was = student.training
    student.eval()
    s_taps, t_taps = Taps(), Taps()
    student(batch.src, batch.dec_in, s_taps)
    teacher(batch.src, batch.dec_in, t_taps)
    student.train(was)
    return {
        k
        for k, (s, t) in enumerate(zip(s_taps.hidden, t_taps.hidden))
        if float((s - t).abs().max()) <= 1e-5 * max(float(t.abs().max()), 1.0)
    }


def _close_stage(history: dict[str, list[float]], partial: dict[str, list[float]]) -> None:
    """Move a finished stage's losses into the history: its mean loss, and the final stage's
    token KL in tenths."""
    losses, kds = partial["losses"], partial["kds"]
    history["stages"].append(sum(losses) / max(len(losses), 1))
    if kds:
        history["final_kd"] = tenths(kds)
    partial["losses"], partial["kds"] = [], []


def tenths(values: list[float]) -> list[float]:
    """A loss curve for the report: the means of (about) ten consecutive chunks."""
    chunk = max(len(values) // 10, 1)
    return [
        sum(values[i : i + chunk]) / len(values[i : i + chunk])
        for i in range(0, len(values), chunk)
    ]


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def distill_seq2seq(
    student: Seq2SeqNet,
    teacher: Seq2SeqNet,
    batches: Iterator[Batch],
    cfg: Seq2SeqDistillConfig,
    seed: int = 0,
    progressive: bool | None = None,
    on_step: Callable[[dict], None] | None = None,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
    checkpoint_every: int = 100,
) -> dict[str, list[float]]:
    """Train ``student`` in place; returns the mean loss of each stage (``"stages"``: one per
    progressive stage, then the final one) and the final stage's token KL per logged chunk.

    ``progressive=False`` skips the progressive stages (a quantized student that starts from
    its trained float twin). Afterwards the student is in eval mode with exactly its own
    parameters (the adapters are discarded).

    With ``checkpoint`` (a file), the student, adapters, optimizer and history are saved
    every ``checkpoint_every`` steps; a later call with the same ``checkpoint_key`` (a hash
    of everything the training depends on) goes on from there with the same batches, and a
    checkpoint with another key is ignored (trained afresh), never continued.
    """
    torch.manual_seed(seed)
    teacher.eval()
    n_enc = len(student.encoder)
    n_taps = n_enc + len(student.decoder) + 2
    width = student.head.in_features
    adapters = (
        nn.ModuleList(TokenAdapter(width) for _ in range(n_taps))
        if cfg.residual_adaptation
        else None
    )
    params = [p for p in student.parameters() if p.requires_grad]
    if adapters is not None:
        params += list(adapters.parameters())
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest}],
        lr=cfg.lr,
        weight_decay=0.0,
    )
    progressive = cfg.progressive if progressive is None else progressive
    plan: list[tuple[str, list[float], int]] = []
    if progressive:
        first = next(batches)
        batches = itertools.chain([first], batches)
        exact = _exact_taps(student, teacher, first)
        for k in range(1, n_taps + 1):
            if k - 1 not in exact:
                plan.append((f"stage {k}", progressive_weights(k, cfg.decay), cfg.stage_steps))
    final = [cfg.decay ** (n_taps - 1 - k) for k in range(n_taps)]
    total = sum(final)
    plan.append(("final", [w / total for w in final], cfg.final_steps))
    total_steps = sum(steps for _, _, steps in plan)

    history: dict[str, list[float]] = {"stages": [], "final_kd": []}
    partial: dict[str, list[float]] = {"losses": [], "kds": []}  # of the stage under way
    done = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["key"] == checkpoint_key:
            student.load_state_dict(state["student"])
            if adapters is not None:
                adapters.load_state_dict(state["adapters"])
            opt.load_state_dict(state["optimizer"])
            history, partial, done = state["history"], state["partial"], state["step"]
    step, t0 = 0, time.perf_counter()
    student.train()
    for name, weights, steps in plan:
        is_final = name == "final"
        end = step + steps
        for _ in range(steps):
            batch = next(batches)
            step += 1
            if step <= done:  # trained before the interruption: same batches, same order
                continue
            lr = cfg.lr * min(1.0, step / max(cfg.warmup, 1))
            if is_final:  # cosine to zero over the final stage
                lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - (end - steps)) / steps))
            for group in opt.param_groups:
                group["lr"] = lr
            t_taps, s_taps = Taps(), Taps()
            with torch.no_grad():
                t_logits = teacher(batch.src, batch.dec_in, t_taps)
            s_logits = student(batch.src, batch.dec_in, s_taps)
            losses = _Losses(t_taps, s_taps, adapters, n_enc)
            src_keep = batch.src.ne(student.pad)
            loss = sum(
                w * losses.tap(k, batch, src_keep, cfg) for k, w in enumerate(weights) if w > 0
            )
            if is_final:
                kd = token_kl(s_logits, t_logits, batch.keep, cfg.temperature)
                ce = F.cross_entropy(
                    s_logits[batch.keep],
                    batch.labels[batch.keep],
                    label_smoothing=cfg.label_smoothing,
                )
                loss = loss + cfg.kd_weight * kd + cfg.ce_weight * ce
                partial["kds"].append(kd.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            partial["losses"].append(loss.item())
            if on_step is not None:
                on_step(
                    {
                        "step": step,
                        "steps": total_steps,
                        "stage": name,
                        "loss": loss.item(),
                        "seconds": time.perf_counter() - t0,
                    }
                )
            if step == end:
                _close_stage(history, partial)
            if checkpoint is not None and (step % checkpoint_every == 0 or step == total_steps):
                state = {"key": checkpoint_key, "step": step, "history": history}
                state |= {"partial": partial, "student": student.state_dict()}
                state |= {"adapters": adapters.state_dict() if adapters is not None else None}
                _save_atomic({**state, "optimizer": opt.state_dict()}, checkpoint)
    student.eval()
    return history
