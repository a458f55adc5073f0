"""The conversion as one explicit list of stages over a run directory.

Each stage reads earlier stages' results through the run store and returns its own typed
result, which the store writes; a finished stage is skipped when its result still reads back
(and, where it has one, its own check of the files it left passes), so a killed run resumes
where it stopped and a damaged file is recomputed. Each stage names the configuration keys it
depends on: a resumed run whose options changed re-runs from the first stage they touch, or is
refused when they fix the run's inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from archnet.config import ConvertConfig
from archnet.errors import ArchnetError
from archnet.results import (
    AblationResult,
    AssembleResult,
    CorruptResult,
    DistillResult,
    EvaluationResult,
    ExportResult,
    FeaturesResult,
    LatencyTable,
    PoolResult,
    PrepareResult,
    Result,
    ScoreResult,
    SearchOutcome,
)
from archnet.stages import (
    ablation,
    assemble,
    distill,
    evaluate,
    export,
    features,
    latency,
    pool,
    report,
    score,
    search,
)
from archnet.stages.common import console, resolve_mode, warn
from archnet.stages.search import RERANK_FINETUNE
from archnet.store import STATE, RunStore, read_json


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunStore], Result | None] | None  # None: done when the run is created
    result: type[Result] | None  # what it returns, kept in ``file``
    file: str | None
    keys: tuple[str, ...] = ()  # config keys (fnmatch on dotted names) it depends on
    reads: Callable[[ConvertConfig], tuple[str, ...]] | None = None  # more, as configured
    verify: Callable[[RunStore], str | None] | None = None  # why its files can't be used
    check: Callable[[RunStore], None] | None = None  # raises when the run cannot go on

    def problem(self, store: RunStore) -> str | None:
        """Why this finished stage's output cannot be used, or None."""
        if self.file is not None and self.result is not None:
            try:
                store.try_load(self.file, self.result)
            except CorruptResult as e:
                return f"{store.path(self.file)} is unreadable ({e})"
        return self.verify(store) if self.verify else None


def _report_readable(store: RunStore) -> str | None:
    try:
        read_json(store.path("report.json"))
    except CorruptResult as e:
        return f"{store.path('report.json')} is unreadable ({e})"
    return None


def _onnx_files(store: RunStore) -> str | None:
    missing = [n for n in ("teacher.onnx", "student.onnx") if not store.path(n).is_file()]
    return f"{', '.join(missing)} missing" if missing else None


STAGES: list[Stage] = [
    Stage(
        "prepare",
        None,
        PrepareResult,
        "prepare.json",
        keys=(
            "model",
            "task",
            "checkpoint",
            "data",
            "eval_data",
            "input_size",
            "selection_fraction",
            "eval_fraction",
            "max_selection",
            "max_samples",
            "seed",
            "blocks",
        ),
    ),
    Stage(
        "candidates",
        pool.run,
        PoolResult,
        "pool.json",
        keys=(
            "target",
            "plugins",
            "candidates",
            "max_macs_ratio",
            "mode",
            "bits",
            "first_last",
            "bit_choices",
        ),
    ),
    Stage(
        "latency",
        latency.run,
        LatencyTable,
        "latency.json",
        keys=("latency.*",),
        check=latency.check_budgets,
    ),
    Stage(
        "features",
        features.run,
        FeaturesResult,
        "features.json",
        keys=("blockwise.max_samples",),
        verify=features.verify,
    ),
    Stage(
        "distill",
        distill.run,
        DistillResult,
        "distill.json",
        keys=("blockwise.*",),
        verify=distill.verify,
    ),
    Stage("score", score.run, ScoreResult, "scores.json", keys=("proxy_images",)),
    Stage(
        "search",
        search.run,
        SearchOutcome,
        "search.json",
        keys=(
            "budget",
            "budget_margin",
            "latency_correction",
            "budget_correction",
            "params_budget",
            "macs_budget",
            "size_budget",
            "rerank*",
        ),
        reads=lambda config: RERANK_FINETUNE if config.rerank > 1 else (),
    ),
    Stage(
        "assemble",
        assemble.run,
        AssembleResult,
        "assemble.json",
        keys=("finetune.*", "arch.*"),
        verify=assemble.verify,
    ),
    Stage("evaluate", evaluate.run, EvaluationResult, "evaluation.json"),
    Stage("export", export.run, ExportResult, "export.json", verify=_onnx_files),
    Stage(
        "ablation",
        ablation.run,
        AblationResult,
        "ablation.json",
        keys=("ablation", "ablation_seeds"),
    ),
    Stage("report", report.run, None, None, verify=_report_readable),
]

# options that change where work runs, not what it produces
RESULT_FREE = ("blockwise.workers", "device", "executor", "ray_address", "gpus_per_job")


def unread(config: ConvertConfig) -> tuple[str, ...]:
    """Options this run never reads: changing them on resume re-runs nothing. A float run
    ignores the quantization options; each mode ignores the other's end-to-end schedule."""
    quant = () if config.bits else ("blockwise.quant_*", "first_last", "bit_choices")
    if resolve_mode(config) != "archnet":
        return (*quant, "arch.*")
    # Arch-Net's end-to-end stage is Arch-Distillation; only re-ranking reads finetune.*
    return (*quant, "finetune.epochs" if config.rerank > 1 else "finetune.*")


NAMES = [s.name for s in STAGES]


def stage(name: str) -> Stage:
    return STAGES[NAMES.index(name)]


def later(name: str) -> list[str]:
    """``name`` and every stage after it."""
    return NAMES[NAMES.index(name) :]


def run_stages(store: RunStore, until: str | None = None) -> None:
    """Run every stage not yet done, in order, timing each; stop after ``until``."""
    if store.path(STATE).exists() and not store.state_is_readable():
        warn(
            f"{store.path(STATE)} is unreadable; running every stage again (finished "
            "candidate jobs and measured latencies are reused)"
        )
    for s in STAGES[1:]:
        if s.name in store.done():
            problem = s.problem(store)
            if problem is None:
                if s.check:
                    s.check(store)
                if s.name == until:
                    return
                continue
            warn(f"{problem}; running stage {s.name} again")
            store.forget(later(s.name))
        console.print(f"[bold]stage[/] {s.name}")
        t0 = time.perf_counter()
        result = s.run(store)
        if s.file is not None and result is not None:
            store.save(s.file, result)
        seconds = time.perf_counter() - t0
        store.mark_done(s.name, seconds)
        console.print(f"  done in {seconds:.1f} s")
        if s.check:
            s.check(store)
        if s.name == until:
            return


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: ConvertConfig, new: ConvertConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ, with (stored, new); an unset input size and task "auto"
    are not changes (both are resolved when the run is created)."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    changes = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    if new.input_size is None:
        changes.pop("input_size", None)
    if new.task == "auto":
        changes.pop("task", None)
    return changes


def first_stage(key: str, config: ConvertConfig | None = None) -> str | None:
    """The first stage whose result depends on config ``key``; None for result-free keys and
    for those ``config`` never reads."""
    if key in RESULT_FREE:
        return None
    if config is not None and any(fnmatch(key, p) for p in unread(config)):
        return None
    for s in STAGES:
        keys = s.keys + (s.reads(config) if s.reads and config is not None else ())
        if any(fnmatch(key, pattern) for pattern in keys):
            return s.name
    return None


def reconcile(store: RunStore, new: ConvertConfig) -> None:
    """Adopt ``new`` settings for a stored run: refuse changes to the run's inputs, and mark
    the stages the other changes affect as not done, saying so."""
    changes = config_changes(store.config, new)
    if not changes:
        return
    if new.input_size is None:
        new.input_size = store.config.input_size
    if new.task == "auto":
        new.task = store.config.task
    shown = {k: f"{k} (stored {a!r}, now {b!r})" for k, (a, b) in changes.items()}
    fixed = [shown[k] for k in changes if first_stage(k) == "prepare"]
    if fixed:
        raise ArchnetError(
            "--resume with options that fix the run's data and blocks, changed: "
            + ", ".join(fixed)
            + "; start a new run with --out NEW_DIR, or resume with the stored options"
        )
    new.validate()
    stages = [s for k in changes if (s := first_stage(k, new))]
    store.config = new
    store.save_config()
    if stages:
        first = min(stages, key=NAMES.index)
        store.forget(later(first))
        console.print(
            f"options changed since the run was stored: {', '.join(shown.values())}; "
            f"stages from {first} on run again"
        )
    else:
        console.print(f"options changed: {', '.join(shown.values())} (no result depends on them)")
