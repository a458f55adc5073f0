"""End-to-end label-free distillation of the assembled student (logit KL + block features)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archnet.distill.bn import freeze_outside, recalibrate_bn
from archnet.distill.losses import nmse
from archnet.tasks import Task, get_task


@dataclass
class FinetuneConfig:
    """The global stage after assembly: the student learns the teacher's outputs on unlabeled data."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 2.0
    feature_weight: float = 0.5  # weight of the block-output NMSE terms (0 turns them off)
    shift: int = 2  # random translation in pixels, the same for teacher and student (0: off)


def random_shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Pad-and-crop translation: cheap augmentation that needs no labels."""
    if pixels <= 0 or x.dim() != 4:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dy, dx = (int(v) for v in torch.randint(0, 2 * pixels + 1, (2,), generator=gen))
    return padded[..., dy : dy + h, dx : dx + w]


class _FeatureTap:
    """Collect the outputs of named submodules during one forward."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(_m, _args, out):
            self.out[name] = out

        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    cfg: FinetuneConfig,
    feature_names: list[str] | None = None,
    seed: int = 0,
    on_step: Callable[[float], None] | None = None,
    changed: Sequence[str] | None = None,
    task: Task | None = None,
) -> list[float]:
    """Train ``student`` in place to match ``teacher`` by ``task``'s distillation loss (KL of
    class distributions by default); returns the per-epoch loss.

    ``changed`` names the modules the student changed (None: all): only their BatchNorm
    statistics move; the rest keep the teacher's (see :mod:`archnet.distill.bn`). Runs where
    the student's parameters are (the teacher must be there too); ``images`` may stay on the
    CPU: each batch is moved.
    """
    task = task or get_task("classification")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    teacher = out_of_place(teacher).eval()  # a tap must read a block's output, not its ReLU's
    out_of_place(student)
    device = next(student.parameters()).device
    names = feature_names if cfg.feature_weight > 0 and feature_names else []
    s_tap, t_tap = _FeatureTap(student, names), _FeatureTap(teacher, names)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(images)
    steps = max(cfg.epochs * math.ceil(n / cfg.batch_size), 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
    history = []
    frozen = freeze_outside(student, changed)
    try:
        for _ in range(cfg.epochs):
            student.train()
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for lo in range(0, n, cfg.batch_size):
                x = random_shift(images[perm[lo : lo + cfg.batch_size]].float(), cfg.shift, gen)
                x = x.to(device)
                with torch.no_grad():
                    t_out = teacher(x)
                loss = task.distill_loss(student(x), t_out, cfg.temperature)
                if names:
                    feats = sum(nmse(s_tap.out[k], t_tap.out[k]) for k in names) / len(names)
                    loss = loss + cfg.feature_weight * feats
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(x)
                if on_step:
                    on_step(loss.item())
            history.append(total / n)
    finally:
        for handle in frozen:
            handle.remove()
        s_tap.close()
        t_tap.close()
    batches = (images[i : i + 256].float().to(device) for i in range(0, n, 256))
    recalibrate_bn(student, batches, changed)
    student.eval()
    return history


def out_of_place(model: nn.Module) -> nn.Module:
    """Every in-place activation of ``model`` made out of place (in place, and returned).

    An in-place ReLU overwrites a tensor that autograd (or a feature tap) still needs: VGG's
    ``ReLU(inplace=True)`` after a tapped conv fails backward. Out of place, the values are the
    same; only memory is spent."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def assemble(teacher: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of the teacher with blocks swapped by qualified name (torchao-style module swap)."""
    student = copy.deepcopy(teacher)
    for name, module in replacements.items():
        student.set_submodule(name, copy.deepcopy(module))
    return student.eval()
