"""The export stage: ONNX files, their checks, and teacher and student timed in one run."""

from __future__ import annotations

from archnet.export import export_and_measure
from archnet.results import ExportResult
from archnet.stages import common
from archnet.stages.assemble import load_student
from archnet.store import RunStore


def run(store: RunStore) -> ExportResult:
    return export_and_measure(
        store.teacher,
        load_student(store),
        common.specs(store),
        common.target(store),
        store.config.latency,
        common.input_shape(store),
        store.root,
        common.task(store).inputs(store, "eval"),
        common.task(store).targets(store, "eval"),
        common.task(store),
    )
