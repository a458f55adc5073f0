"""The export stage: ONNX files, their checks, and teacher and student timed in one run."""

from __future__ import annotations

from archnet.export import export_and_measure
from archnet.results import ExportResult
from archnet.stages import common
from archnet.stages.assemble import load_student
from archnet.store import RunStore


def run(store: RunStore) -> ExportResult:
    task = common.task(store)
    return export_and_measure(
        store.teacher,
        load_student(store),
        common.specs(store),
        common.target(store),
        store.config.latency,
        common.input_shape(store),
        store.root,
        task.inputs(store, "eval"),
        task.targets(store, "eval"),
        task,
    )
