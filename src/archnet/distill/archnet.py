"""Arch-Distillation (Arch-Net, Fang et al. 2021): progressive, label-free student distillation.

The assembled student is trained on its own forward pass to match the teacher block by block,
one more block per stage (earlier targets keep a decaying weight so fixing block k does not
undo the blocks before it), then end to end with all block features plus the logit KL.
Two training-only aids help the blocks the student cannot copy exactly (in
:mod:`archnet.distill.aids`, one pair per feature layout): Teacher Attention, a gate from the
teacher's feature that re-weights the student's block output channels, and Residual Feature
Adaptation, an adapter through which the feature loss compares the student with the teacher.
Both are discarded at the end; the student keeps exactly its own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from archnet.distill.aids import AIDS, LAYOUT_OF_RANK
from archnet.distill.bn import freeze_outside, recalibrate_bn
from archnet.distill.finetune import _FeatureTap, out_of_place, random_shift
from archnet.distill.losses import nmse
from archnet.tasks import Task, get_task


@dataclass
class ArchDistillConfig:
    """Schedule and switches of Arch-Distillation (the switches are the paper's ablations)."""

    epochs_per_stage: float = 1.0  # progressive stages, one per block, this many epochs each
    global_epochs: int = 4  # final stage: all block features + logit term
    decay: float = 0.8  # loss weight of an earlier block's target: decay ** (k - j)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 2.0
    logit_weight: float = 1.0
    shift: int = 2  # same random translation for teacher and student (0: off)
    teacher_attention: bool = True
    residual_adaptation: bool = True
    progressive: bool = True  # False: all block losses, equal weights, same step count


def progressive_weights(stage: int, decay: float) -> list[float]:
    """Loss weights of blocks 1..``stage`` in progressive stage ``stage``, summing to 1.

    Block j gets ``decay ** (stage - j)``: the newest block dominates, earlier targets keep a
    fading pull so training block k does not drift the blocks already fitted.
    """
    if stage < 1:
        raise ValueError(f"stage counts from 1, got {stage}")
    if decay < 0:
        raise ValueError(f"decay must be >= 0, got {decay}")
    raw = [decay ** (stage - j) for j in range(1, stage + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _batches_per_epoch(n_images: int, batch_size: int) -> int:
    return math.ceil(n_images / batch_size) if n_images > 0 else 0


def _stage_steps(n_images: int, cfg: ArchDistillConfig) -> int:
    """Steps of one progressive stage: at least one whenever stages are asked for."""
    if cfg.epochs_per_stage <= 0 or n_images <= 0:
        return 0
    return max(1, round(cfg.epochs_per_stage * _batches_per_epoch(n_images, cfg.batch_size)))


def total_steps(n_images: int, n_blocks: int, cfg: ArchDistillConfig) -> int:
    """Optimizer steps of :func:`arch_distill` (the no-progressive ablation takes the same)."""
    progressive = n_blocks * _stage_steps(n_images, cfg)
    return progressive + cfg.global_epochs * _batches_per_epoch(n_images, cfg.batch_size)


class _StudentTap:
    """Record each student block's raw output; with gates, pass ``s * g(t)`` on downstream.

    The raw output goes into the feature loss because it is what the deployed student produces;
    the gate only shapes what later blocks see while training.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        teacher_out: dict[str, torch.Tensor],
        gates: nn.ModuleList | None = None,
    ) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self._teacher_out = teacher_out
        self.handles = [
            model.get_submodule(n).register_forward_hook(
                self._hook(n, None if gates is None else gates[j])
            )
            for j, n in enumerate(names)
        ]

    def _hook(self, name: str, gate: nn.Module | None):
        def fn(_m, _args, out):
            self.out[name] = out
            if gate is None:
                return None
            return out * gate(self._teacher_out[name])

        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _probe_channels(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    names: list[str],
    layouts: Sequence[str] | None,
    need_aids: bool,
) -> list[tuple[str, int]]:
    """(layout, channels) of each block output, checking the student's shapes match the
    teacher's; a layout not given is read from the rank (4: NCHW, 3: tokens, 2: vector)."""
    was_training = student.training
    s_tap, t_tap = _FeatureTap(student.eval(), names), _FeatureTap(teacher, names)
    try:
        teacher(x)
        student(x)
    finally:
        s_tap.close()
        t_tap.close()
        student.train(was_training)
    found = []
    for i, n in enumerate(names):
        s, t = s_tap.out.get(n), t_tap.out.get(n)
        if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor):
            raise ValueError(f"block {n!r} did not return one tensor in both models")
        if s.shape != t.shape:
            raise ValueError(
                f"block {n!r}: student output {tuple(s.shape)} != teacher {tuple(t.shape)}"
            )
        layout = layouts[i] if layouts else LAYOUT_OF_RANK.get(t.dim(), "")
        if need_aids and layout not in AIDS:
            raise ValueError(
                f"block {n!r}: teacher attention and residual adaptation serve "
                f"{', '.join(AIDS)} features, not {layout or tuple(t.shape)}"
            )
        found.append((layout, t.shape[AIDS[layout][2]] if need_aids else t.shape[1]))
    return found


def _batch_stream(
    images: torch.Tensor, cfg: ArchDistillConfig, gen: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Endless shuffled, shifted batches; stages of fractional epochs continue the same pass."""
    n = len(images)
    while True:
        perm = torch.randperm(n, generator=gen).to(images.device)
        for lo in range(0, n, cfg.batch_size):
            x = images[perm[lo : lo + cfg.batch_size]].float()
            yield random_shift(x, cfg.shift, gen).to(device)


def _train(
    params: list[nn.Parameter],
    steps: int,
    batches: Iterator[torch.Tensor],
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    cfg: ArchDistillConfig,
    on_step: Callable[[float], None] | None,
) -> list[tuple[float, int]]:
    """One stage: a fresh AdamW with cosine decay; returns (loss, batch size) per step.

    A fresh optimizer per stage because each stage changes the objective; cosine decay lets
    the stage settle before the next block's loss is added.
    """
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps))
    )
    losses = []
    for _ in range(steps):
        x = next(batches)
        loss = step_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append((loss.item(), len(x)))
        if on_step:
            on_step(loss.item())
    return losses


def _mean(losses: list[tuple[float, int]]) -> float:
    count = sum(n for _, n in losses)
    return sum(v * n for v, n in losses) / count if count else float("nan")


def arch_distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    block_names: list[str],
    cfg: ArchDistillConfig,
    seed: int = 0,
    on_step: Callable[[float], None] | None = None,
    changed: Sequence[str] | None = None,
    task: Task | None = None,
    layouts: Sequence[str] | None = None,
) -> dict[str, list[float]]:
    """Train ``student`` in place to match ``teacher`` on unlabeled ``images``; the logit term
    is ``task``'s distillation loss (KL of class distributions by default).

    ``changed`` names the modules the student changed (None: all): only their BatchNorm
    statistics move; the rest keep the teacher's (see :mod:`archnet.distill.bn`). ``layouts``
    (one per block, as in ``BlockSpec.layout``) chooses the Teacher Attention and Residual
    Feature Adaptation modules: convolutional for NCHW, fully connected for channels-last.

    Returns the mean loss per progressive stage (``"progressive"``; one entry when
    ``progressive`` is off), per global epoch (``"global"``) and the logit KL part of the
    latter (``"global_kl"``). Afterwards no hooks remain, the student has exactly its own
    parameters, its BatchNorm statistics are recalibrated and it is in eval mode.

    Residual adapters stay in the global stage: they were fitted during the progressive stages,
    so dropping them would make the feature term jump to a mismatch the raw blocks were never
    asked to close, and the logit term already judges the raw student that gets deployed.
    Teacher Attention is switched off there so the student learns to stand alone.
    """
    task = task or get_task("classification")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out_of_place(student)  # taps and autograd read what in-place ops would overwrite
    out_of_place(teacher)
    teacher = teacher.eval()
    names = list(block_names)
    device = _device(student)
    n = len(images)
    history: dict[str, list[float]] = {"progressive": [], "global": [], "global_kl": []}
    if n == 0:
        student.eval()
        return history

    need_aids = cfg.teacher_attention or cfg.residual_adaptation
    probe = images[: min(n, 2)].float().to(device)
    found = _probe_channels(student, teacher, probe, names, layouts, need_aids) if names else []
    gates = (
        nn.ModuleList(AIDS[layout][0](c) for layout, c in found).to(device)
        if cfg.teacher_attention and names
        else None
    )
    adapters = (
        nn.ModuleList(AIDS[layout][1](c) for layout, c in found).to(device)
        if cfg.residual_adaptation and names
        else None
    )
    student_params = [p for p in student.parameters() if p.requires_grad]
    adapter_params = list(adapters.parameters()) if adapters is not None else []
    gate_params = list(gates.parameters()) if gates is not None else []
    batches = _batch_stream(images, cfg, gen, device)

    def adapted(j: int, s: torch.Tensor) -> torch.Tensor:
        return s if adapters is None else adapters[j](s)

    t_tap = _FeatureTap(teacher, names)
    s_tap: _StudentTap | None = None
    frozen = freeze_outside(student, changed)
    try:
        # Progressive stages (or the equal-weight ablation over the same number of steps).
        stage_steps = _stage_steps(n, cfg)
        if cfg.progressive:
            plan = [
                (progressive_weights(k, cfg.decay), stage_steps) for k in range(1, len(names) + 1)
            ]
        else:
            plan = [([1.0 / len(names)] * len(names), stage_steps * len(names))] if names else []
        plan = [(w, s) for w, s in plan if s > 0]
        if plan:
            s_tap = _StudentTap(student, names, t_tap.out, gates)
            for weights, steps in plan:

                def feature_loss(x: torch.Tensor, weights: list[float] = weights) -> torch.Tensor:
                    with torch.no_grad():
                        teacher(x)
                    student(x)
                    return sum(
                        w * nmse(adapted(j, s_tap.out[name]), t_tap.out[name])
                        for j, (name, w) in enumerate(zip(names, weights))
                    )

                student.train()
                losses = _train(
                    student_params + gate_params + adapter_params,
                    steps,
                    batches,
                    feature_loss,
                    cfg,
                    on_step,
                )
                history["progressive"].append(_mean(losses))
            s_tap.close()

        # Global stage: teacher attention off, block features + logit KL.
        per_epoch = _batches_per_epoch(n, cfg.batch_size)
        if cfg.global_epochs > 0:
            s_tap = _StudentTap(student, names, t_tap.out, None)
            kls: list[float] = []

            def global_loss(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    t_out = teacher(x)
                kl = task.distill_loss(student(x), t_out, cfg.temperature)
                kls.append(kl.item())
                if not names:
                    return cfg.logit_weight * kl
                feats = sum(
                    nmse(adapted(j, s_tap.out[name]), t_tap.out[name])
                    for j, name in enumerate(names)
                ) / len(names)
                return feats + cfg.logit_weight * kl

            student.train()
            losses = _train(
                student_params + adapter_params,
                cfg.global_epochs * per_epoch,
                batches,
                global_loss,
                cfg,
                on_step,
            )
            for e in range(cfg.global_epochs):
                chunk = slice(e * per_epoch, (e + 1) * per_epoch)
                history["global"].append(_mean(losses[chunk]))
                sizes = [b for _, b in losses[chunk]]
                history["global_kl"].append(_mean(list(zip(kls[chunk], sizes))))
    finally:
        for handle in frozen:
            handle.remove()
        if s_tap is not None:
            s_tap.close()
        t_tap.close()
        t_tap.out.clear()

    batches = (images[i : i + 256].float().to(device) for i in range(0, n, 256))
    recalibrate_bn(student, batches, changed)
    student.eval()
    return history
