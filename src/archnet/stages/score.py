"""The score stage: replace-one-block KL of every choice on the selection split.

Each choice's score is a job on the run's executor (the teacher, the selection inputs and
logits sent to each worker once); the driver writes it as soon as it is known, under its job's
key, so a killed stage resumes choice by choice and a retrained choice is scored again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from archnet.distill.blockwise import load_candidate, trained_checkpoint
from archnet.executors import Job
from archnet.results import ScoreResult
from archnet.score import replace_one_block
from archnet.stages import common
from archnet.stages.distill import all_jobs
from archnet.stages.features import cache
from archnet.store import RunStore, read_part, write_json


@dataclass
class ScoreShared:
    """What every score job reads."""

    task: Any
    teacher: torch.nn.Module
    inputs: torch.Tensor
    teacher_logits: torch.Tensor
    eval_inputs: torch.Tensor | None
    eval_targets: Any
    device: str = "cpu"


def score_job(shared: ScoreShared, payload: tuple, _needed=None) -> dict:
    """Replace-one-block score of one trained choice (its checkpoint given as read)."""
    job, ckpt = payload
    teacher = shared.teacher.to(shared.device)  # once per worker: later calls find it there
    module, metrics = load_candidate(job, teacher.get_submodule(job.spec.name), ckpt)
    score = replace_one_block(
        shared.task,
        teacher,
        job.spec.name,
        module.to(shared.device),
        shared.inputs,
        shared.teacher_logits,
        shared.eval_inputs,
        shared.eval_targets,
    )
    return {**score, "val_nmse": metrics["val_nmse"]}


def run(store: RunStore) -> ScoreResult:
    """Replace-one-block KL for every choice on the selection split; where the evaluation split
    is labelled, the swapped teacher's top-1 on its first ``proxy_images`` images too (it only
    measures the proxies, no choice reads it)."""
    cfg, seed = store.config.blockwise, store.config.seed
    task = common.task(store)
    t_out = torch.from_numpy(np.array(cache(store).load("selection", "logits")))
    cap = store.config.proxy_images
    targets = task.targets(store, "eval")
    targets = targets[:cap] if targets is not None and cap > 0 else None
    ev = task.inputs(store, "eval")[:cap] if targets is not None else None
    inputs = task.inputs(store, "selection")
    shared = ScoreShared(task, store.teacher, inputs, t_out, ev, targets, common.device(store))
    found: dict[tuple[str, str], dict] = {}
    jobs = all_jobs(store, choices_only=True)
    work, parts = [], {}
    for job in jobs:
        key = f"{job.key(cfg, seed)}:{cap}"  # a score is the job's on these images
        part = job.path.with_suffix(".score.json")
        score = read_part(part, key)
        if isinstance(score, dict):
            found[job.spec.name, job.name] = score
            continue
        work.append(Job(key, (job, trained_checkpoint(job)), label=f"{job.spec.name}/{job.name}"))
        parts[key] = part
    executor = common.executor(store)
    board = common.job_board(store, "score", len(jobs), len(jobs) - len(work), executor)
    failures = []
    with common.progress_bar() as bar:
        bar_task = bar.add_task("replace-one-block scores", total=len(jobs))
        bar.update(bar_task, completed=len(jobs) - len(work))
        for outcome in executor.run(score_job, shared, work, {}):
            job = outcome.job.payload[0]
            if outcome.error:
                failures.append((job, outcome.error))
                board.fail(outcome.job.label, outcome.error)
                continue
            write_json(parts[outcome.job.key], {"key": outcome.job.key, "score": outcome.result})
            found[job.spec.name, job.name] = outcome.result
            board.finish()
            bar.advance(bar_task)
    store.teacher.cpu()  # moved by in-process score jobs
    common.raise_failed("score", failures, len(work))
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for job in jobs:  # in the choices' order, whatever order the jobs finished in
        scores.setdefault(job.spec.name, {})[job.name] = found[job.spec.name, job.name]
    return ScoreResult(scores=scores)
