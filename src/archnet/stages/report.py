"""The report stage: report.json, report.md and blocks.png from every stage's result."""

from __future__ import annotations

from archnet.report import ReportInputs, build_report, write_report
from archnet.results import (
    AblationResult,
    AssembleResult,
    EvaluationResult,
    ExportResult,
    LatencyTable,
    PoolResult,
    ScoreResult,
    SearchOutcome,
)
from archnet.stages import common
from archnet.store import RunStore


def inputs(store: RunStore) -> ReportInputs:
    cfg = store.config
    return ReportInputs(
        model=cfg.model,
        latency_correction=cfg.latency_correction,
        target=common.target(store).to_dict(),
        bits={
            "bits": cfg.bits,
            "bit_choices": cfg.bit_choices if cfg.bits == "auto" else None,
            "first_last": cfg.first_last,
        },
        prepare=store.prepared,
        pool=store.load("pool.json", PoolResult),
        latency=store.load("latency.json", LatencyTable),
        scores=store.load("scores.json", ScoreResult),
        search=store.load("search.json", SearchOutcome),
        assemble=store.load("assemble.json", AssembleResult),
        evaluation=store.load("evaluation.json", EvaluationResult),
        export=store.load("export.json", ExportResult),
        ablation=store.load("ablation.json", AblationResult),
        stage_seconds={k: v["seconds"] for k, v in store.done().items()},
    )


def run(store: RunStore) -> None:
    """Write the report files; report.json is what later commands read."""
    write_report(build_report(inputs(store)), store.root)
