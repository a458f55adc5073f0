"""The assemble stage: the chosen candidates swapped into the shell, then trained end to end.

The end-to-end stage (KD fine-tune in HANT mode, Arch-Distillation in Arch-Net mode) is kept
only where it helps: the student before and after it is scored on the selection split and the
better one stays, so a fine-tune that overfits the training images cannot make the result worse.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from archnet.channelsplit import split_wide_layers
from archnet.choices import parse_choice
from archnet.distill.blockwise import load_candidate
from archnet.distill.finetune import assemble
from archnet.flops import count_macs, count_params
from archnet.quant import model_size_bits
from archnet.results import AssembleResult, SearchOutcome
from archnet.stages import common
from archnet.stages.distill import all_jobs
from archnet.stages.features import cache
from archnet.store import RunStore

STUDENT = "student.pt"


def run(store: RunStore) -> AssembleResult:
    """Build the student from the choices, then distill it end to end without labels."""
    student, conversions, changed = build_student(store)
    before = selection_kl(store, student)
    assembled = copy.deepcopy(student)
    history = train_student(store, student, store.config.arch, "end-to-end distillation", changed)
    after = selection_kl(store, student)
    kept = "fine-tuned"
    if not after <= before:  # also when training diverged to NaN
        student, kept = assembled, "assembled"
        common.warn(
            f"the end-to-end stage raised the selection KL ({before:.4f} -> {after:.4f}); "
            "keeping the student as assembled"
        )
    torch.save(student, store.path(STUDENT))
    size = tuple(store.prepared.input_size)
    return AssembleResult(
        mode=common.mode(store),
        conversions=conversions,
        changed=changed,
        kept=kept,
        selection={"before": {"kl": before}, "after": {"kl": after}},
        loss=history,
        params=count_params(student),
        macs=count_macs(student, size),
        size_bits=model_size_bits(student),
    )


def load_student(store: RunStore) -> nn.Module:
    from archnet.errors import ArchnetError
    from archnet.store import missing_module

    try:
        student = torch.load(store.path(STUDENT), map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:  # the student holds the teacher's own classes
        raise missing_module(store.path(STUDENT), "the student", e) from None
    except Exception as e:  # missing or truncated
        raise ArchnetError(
            f"{store.path(STUDENT)} is unreadable ({type(e).__name__}); resume the run to "
            "assemble it again"
        ) from None
    return student.eval()


def verify(store: RunStore) -> str | None:
    try:
        load_student(store)
    except Exception as e:
        return str(e)
    return None


def build_student(
    store: RunStore, names: list[str] | None = None
) -> tuple[nn.Module, list[list[str]], list[str]]:
    """The shell with the chosen candidates (``names``, one per block; default: the search's
    choice) trained blockwise and swapped in, not yet trained end to end; the outside
    conversions; and the modules that differ from the teacher's."""
    names = names or store.load("search.json", SearchOutcome).names
    jobs = {(j.spec.name, j.name): j for j in all_jobs(store, choices_only=True)}
    replacements = {
        spec.name: load_candidate(jobs[(spec.name, name)], common.teacher_block(store, spec))[0]
        for spec, name in zip(common.specs(store), names)
        if name != "teacher"
    }
    shell, conversions = common.shell(store)
    student = assemble(shell, replacements)
    cap = common.target(store).rules.max_channels
    if common.mode(store) == "archnet" and cap:
        # candidates were trained unsplit; the split is exact, so it is applied once, here
        split_wide_layers(student, cap)
    student = common.quantize_outside(
        store, student, common.task(store).inputs(store, "train")[:256]
    )
    swapped = [
        spec.name
        for spec, name in zip(common.specs(store), names)
        if parse_choice(name)[0] != "teacher"
    ]
    return student, conversions, swapped + [row[0] for row in conversions]


def train_student(
    store: RunStore,
    student: nn.Module,
    arch_cfg: Any,
    label: str,
    changed: list[str],
    seed: int | None = None,
) -> Any:
    """End-to-end label-free training: KD fine-tune (HANT) or Arch-Distillation (Arch-Net),
    on the run's ``--device``."""
    from archnet.distill.finetune import out_of_place

    task = common.task(store)
    images = task.inputs(store, "train")
    names = [s.name for s in common.specs(store)]
    kw = {"seed": store.config.seed if seed is None else seed, "changed": changed, "task": task}
    device = common.device(store)
    out_of_place(student).to(device)  # taps and autograd read what in-place ops overwrite
    out_of_place(store.teacher).to(device)
    try:
        return _train(store, student, arch_cfg, label, images, names, kw)
    finally:  # the run's models live on the CPU between stages
        student.cpu()
        store.teacher.cpu()


def _train(store, student, arch_cfg, label, images, names, kw) -> Any:
    from archnet.distill.archnet import arch_distill, total_steps
    from archnet.distill.finetune import finetune

    with common.progress_bar() as bar:
        if common.mode(store) == "archnet":
            line = bar.add_task(label, total=total_steps(len(images), len(names), arch_cfg))
            step = lambda _loss: bar.advance(line)  # noqa: E731
            layouts = [s.layout for s in common.specs(store)]
            return arch_distill(
                student, store.teacher, images, names, arch_cfg, on_step=step, layouts=layouts, **kw
            )
        cfg = store.config.finetune
        line = bar.add_task(label, total=cfg.epochs * -(-len(images) // cfg.batch_size))
        step = lambda _loss: bar.advance(line)  # noqa: E731
        return finetune(student, store.teacher, images, cfg, names, on_step=step, **kw)


def selection_kl(store: RunStore, model: nn.Module) -> float:
    """KL of ``model``'s outputs from the teacher's on the selection split."""
    task = common.task(store)
    t_out = torch.from_numpy(np.array(cache(store).load("selection", "logits")))
    return float(task.distill_loss(task.outputs(model, task.inputs(store, "selection")), t_out))
