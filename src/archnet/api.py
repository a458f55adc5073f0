"""The public entry points: convert a teacher, resume a run, finish one."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from archnet.config import ConvertConfig
from archnet.data import ImageData
from archnet.errors import ArchnetError
from archnet.results import LatencyTable, PoolResult
from archnet.search import solve
from archnet.stages import prepare, reconcile, run_stages
from archnet.stages.assemble import load_student
from archnet.store import RunStore, open_store, prepare_directory


@dataclass
class ConversionResult:
    """What :func:`convert` hands back: the student, the report, and where everything lies."""

    student: nn.Module
    report: dict[str, Any]
    run_dir: Path


def is_run(root: str | Path) -> bool:
    return (Path(root) / "prepare.json").exists()


def convert(
    teacher: nn.Module,
    data: ImageData | Any | str,
    target: str = "cpu-ort",
    budget: float | str = 0.5,
    out: str | Path = "runs/convert",
    eval_data: ImageData | str | None = None,
    resume: bool = False,
    config: ConvertConfig | None = None,
    **overrides: Any,
) -> ConversionResult:
    """Convert ``teacher`` into a student that meets ``budget`` on ``target``, label-free.

    ``data`` is unlabeled images: an ImageData, an (N, C, H, W) tensor, a data set name
    ('fashion-mnist', 'digits') or a path; ``budget`` is a fraction of the teacher's measured
    latency or a string such as '2.5ms'. The input size is the model's own (timm's
    ``pretrained_cfg``) unless ``config.input_size`` says otherwise. Other
    :class:`ConvertConfig` fields can be given as keyword arguments.
    """
    cfg = config or ConvertConfig(model="python")
    cfg.target, cfg.budget = target, str(budget)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ArchnetError(f"convert() got unknown option {key!r}")
        setattr(cfg, key, value)
    if isinstance(data, str):
        cfg.data = data
    if isinstance(eval_data, str):
        cfg.eval_data = eval_data
    return start(teacher, data, cfg, out, eval_data, resume)


def start(
    teacher: nn.Module,
    data: Any,
    config: ConvertConfig,
    out: str | Path,
    eval_data: Any = None,
    resume: bool = False,
) -> ConversionResult:
    """Create the run in ``out`` (or, with ``resume``, continue the one there) and finish it."""
    root = Path(out)
    if is_run(root) and not resume:
        raise ArchnetError(
            f"run directory {root} already holds a run; pass --resume to continue it "
            "or --out NEW_DIR to start another"
        )
    if is_run(root):
        return _continue(root, config, teacher, data, eval_data)
    config.validate()
    prepare_directory(root)
    store = RunStore(root, config)
    with store.locked():
        prepare.create(store, teacher, data, eval_data)
        return finish(store)


def resume(
    out: str | Path,
    config: ConvertConfig | None = None,
    teacher: nn.Module | None = None,
    data: Any = None,
    eval_data: Any = None,
) -> ConversionResult:
    """Continue the run in ``out``. ``config``, when given, replaces the stored settings (see
    :func:`archnet.stages.reconcile` for what may change); a ``teacher`` and ``data``, when
    given, must be the ones the run was created with."""
    return _continue(out, config, teacher, data, eval_data)


def _continue(
    out: str | Path, config: ConvertConfig | None, teacher: Any, data: Any, eval_data: Any
) -> ConversionResult:
    store = open_store(out)
    with store.locked():
        _same_inputs(store, teacher, data, eval_data)
        if config is not None:
            reconcile(store, config)
        return finish(store)


# a measured student this far over its latency budget is re-solved once, corrected
MISSED_BUDGET = 1.10


def finish(store: RunStore) -> ConversionResult:
    """Run every stage not done yet, holding the run's lock; a student measured more than 10%
    over its latency budget is re-solved once with the measured correction (see
    :func:`correct_budget`)."""
    with store.locked():
        run_stages(store)
        report = json.loads(store.path("report.json").read_text())
        if correct_budget(store, report):
            run_stages(store)
            report = json.loads(store.path("report.json").read_text())
        return ConversionResult(load_student(store), report, store.root)


def correct_budget(store: RunStore, report: dict) -> bool:
    """Whether the search runs again: ``budget_correction`` is on, the measured student missed
    the budget by more than ``MISSED_BUDGET``, no correction was made yet, latency is measured
    (an estimate is exact), and a student fits the corrected budget. The correction is the
    measured over the predicted student/teacher ratio; it divides the budget the search
    enforces (``latency_correction``)."""
    from archnet.stages.common import warn
    from archnet.stages.latency import cost_table, limits

    missed = report.get("measured_over_budget", 0.0)
    cfg = store.config
    if not cfg.budget_correction or cfg.latency_correction != 1.0 or missed <= MISSED_BUDGET:
        return False
    if report["latency"].get("estimated"):
        return False
    t, s = report["teacher"], report["student"]
    factor = (s["latency_ms"] / t["latency_ms"]) / (
        s["predicted_latency_ms"] / t["predicted_latency_ms"]
    )
    if factor <= 1.0:
        return False
    corrected = copy.deepcopy(store.config)
    corrected.latency_correction = round(factor, 4)
    latency = store.load("latency.json", LatencyTable)
    table = cost_table(store.load("pool.json", PoolResult), latency)
    trial = RunStore(store.root, corrected)
    try:
        solve(table, limits(trial, latency))
    except ArchnetError as e:
        warn(f"measured, the student is {missed:.2f}x over its latency budget; {e}")
        return False
    warn(
        f"measured, the student is {missed:.2f}x over its latency budget (the table predicted "
        f"it {factor:.2f}x too fast): searching again with the budget divided by {factor:.2f}"
    )
    reconcile(store, corrected)
    return True


def _same_inputs(store: RunStore, teacher: Any, data: Any, eval_data: Any) -> None:
    """Refuse to resume with another teacher or other data than the run was created with."""
    if teacher is None or data is None:
        return
    probe = ConvertConfig.from_dict(store.config.to_dict())
    if prepare.fingerprint_of(teacher, data, eval_data, probe) != store.prepared.fingerprint:
        raise ArchnetError(
            f"--resume with another teacher or other data than the run in {store.root} was "
            "created with; start a new run with --out NEW_DIR"
        )
