"""The ablation stage (Arch-Net mode, on request): the same student trained with each
training-only aid switched off, over several seeds, scored on the evaluation split.

Each (variant, seed) is written when done, so a killed ablation resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from archnet.results import AblationResult, PoolResult, SearchOutcome
from archnet.stages import common
from archnet.stages.assemble import build_student, train_student
from archnet.store import RunStore, read_json, write_json

VARIANTS = {
    "full method": {},
    "without Teacher Attention": {"teacher_attention": False},
    "without Residual Feature Adaptation": {"residual_adaptation": False},
    "without the progressive schedule": {"progressive": False},
}


def run(store: RunStore) -> AblationResult:
    seeds = [store.config.seed + i for i in range(store.config.ablation_seeds)]
    if not store.config.ablation or common.mode(store) != "archnet":
        return AblationResult(seeds=[], rows={}, skipped=True)
    task = common.task(store)
    inputs, targets = task.inputs(store, "eval"), task.targets(store, "eval")
    t_out = task.outputs(store.teacher, inputs)
    rows: dict[str, dict[str, list[float]]] = {}
    folder = store.path("ablation")
    folder.mkdir(exist_ok=True)
    for label, switch in VARIANTS.items():
        cfg = dataclasses.replace(store.config.arch, **switch)
        for seed in seeds:
            key = _key(store, cfg, seed)
            part = folder / f"{key}.json"
            try:
                metrics = read_json(part)["metrics"]
            except (ValueError, KeyError, TypeError):
                student, _, changed = build_student(store)
                train_student(store, student, cfg, f"{label} (seed {seed})", changed, seed=seed)
                s_out = task.outputs(student, inputs)
                metrics = {"kl": task.divergence(s_out, t_out)}
                if targets is not None:
                    metrics.update(task.metrics(s_out, targets))
                write_json(part, {"variant": label, "seed": seed, "metrics": metrics})
            for metric, value in metrics.items():
                rows.setdefault(label, {}).setdefault(metric, []).append(value)
    return AblationResult(seeds=seeds, rows=rows)


def _key(store: RunStore, cfg: object, seed: int) -> str:
    """Names one ablation training: the student it starts from (the chosen choices' job keys,
    which hold the teacher, data and every setting their training read), its bits, schedule
    and seed."""
    c = store.config
    names = store.load("search.json", SearchOutcome).names
    pools = store.load("pool.json", PoolResult)
    chosen = [
        job.key(c.blockwise, c.seed)
        for job in common.jobs(store, pools, choices_only=True)
        if job.name == names[job.block_index]
    ]
    parts = [
        store.prepared.fingerprint,
        names,
        chosen,
        c.bits,
        c.first_last,
        dataclasses.asdict(cfg),
        seed,
    ]
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
