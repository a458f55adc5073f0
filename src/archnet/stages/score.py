"""The score stage: replace-one-block KL of every choice on the selection split.

Each choice's score is written as soon as it is known, under its job's key, so a killed stage
resumes choice by choice and a retrained choice is scored again.
"""

from __future__ import annotations

import numpy as np
import torch

from archnet.distill.blockwise import load_candidate
from archnet.results import ScoreResult
from archnet.score import replace_one_block
from archnet.stages import common
from archnet.stages.distill import all_jobs
from archnet.stages.features import cache
from archnet.store import RunStore, read_part, write_json


def run(store: RunStore) -> ScoreResult:
    """Replace-one-block KL for every choice on the selection split; where the evaluation split
    is labelled, the swapped teacher's top-1 on its first ``proxy_images`` images too (it only
    measures the proxies, no choice reads it)."""
    cfg, seed = store.config.blockwise, store.config.seed
    task = common.task(store)
    inputs = task.inputs(store, "selection")
    t_out = torch.from_numpy(np.array(cache(store).load("selection", "logits")))
    cap = store.config.proxy_images
    targets = task.targets(store, "eval")
    targets = targets[:cap] if targets is not None and cap > 0 else None
    ev = task.inputs(store, "eval")[:cap] if targets is not None else None
    scores: dict[str, dict[str, dict[str, float]]] = {}
    jobs = all_jobs(store, choices_only=True)
    with common.progress_bar() as bar:
        bar_task = bar.add_task("replace-one-block scores", total=len(jobs))
        for job in jobs:
            key = f"{job.key(cfg, seed)}:{cap}"  # a score is the job's on these images
            part = job.path.with_suffix(".score.json")
            score = read_part(part, key)
            if not isinstance(score, dict):
                module, metrics = load_candidate(job, common.teacher_block(store, job.spec))
                score = replace_one_block(
                    task, store.teacher, job.spec.name, module, inputs, t_out, ev, targets
                )
                score["val_nmse"] = metrics["val_nmse"]
                write_json(part, {"key": key, "score": score})
            scores.setdefault(job.spec.name, {})[job.name] = score
            bar.advance(bar_task)
    return ScoreResult(scores=scores)
