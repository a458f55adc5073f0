"""The report as a pure function of the stages' results: built by hand here, no run."""

from __future__ import annotations

import json

import pytest

from archnet.report import ReportInputs, build_report, render_markdown, write_report
from archnet.results import (
    AblationResult,
    AssembleResult,
    EvaluationResult,
    ExportResult,
    LatencyTable,
    PoolResult,
    PrepareResult,
    ScoreResult,
    SearchOutcome,
)

CHOICES = ["teacher", "skip"]


def inputs(student_ms: float = 1.0, predicted_ms: float = 1.1, **kw) -> ReportInputs:
    blocks = ["b0", "b1"]
    costs = {c: {"params": 10, "macs": 20, "size_bits": 320} for c in CHOICES}
    parts = {
        "prepare": PrepareResult(
            blocks=[{"name": b, "in_shape": [4, 8, 8], "out_shape": [4, 8, 8]} for b in blocks],
            splits={"train": 100, "selection": 20, "eval": 30},
            eval_source="given: mine",
            labelled_eval=True,
            input_size=[3, 8, 8],
            fingerprint="f",
        ),
        "pool": PoolResult(
            pools={b: {"candidates": CHOICES, "choices": CHOICES, "costs": costs} for b in blocks},
            rejected={},
            unserved={},
        ),
        "latency": LatencyTable(
            backend="onnxruntime",
            device="cpu",
            threads=1,
            batch_size=1,
            input_shape=[1, 3, 8, 8],
            blocks={b: {"teacher": 0.5, "skip": 0.01} for b in blocks},
            teacher_blocks={b: 0.5 for b in blocks},
            outside_ms=1.0,
            teacher_outside_ms=1.0,
            overhead_ms={},
            teacher_ms=2.0,
            teacher_predicted_ms=2.0,
            teacher_params=100,
            teacher_macs=200,
            outside_params=80,
            outside_macs=160,
            outside_size_bits=2560,
            teacher_size_bits=3200,
            cache_hits=0,
            exporters={
                "blocks": {"b0": {"teacher": "torchscript/opset17", "skip": "dynamo/opset18"}}
            },
        ),
        "scores": ScoreResult(
            scores={
                b: {c: {"kl": 0.1, "val_nmse": 0.2, "top1": 90.0} for c in CHOICES} for b in blocks
            }
        ),
        "search": SearchOutcome(
            budgets={"latency_ms": 1.2},
            limits={"latency_ms": 1.16},
            budget_spec="0.6",
            result={
                "names": ["teacher", "skip"],
                "totals": {
                    "latency_ms": predicted_ms,
                    "params": 90,
                    "macs": 180,
                    "size_bits": 2880,
                },
                "objective": 0.1,
                "solve_time_s": 0.01,
                "status": "optimal",
            },
            pareto=[],
            table={"blocks": blocks},
            reranked=[],
        ),
        "assemble": AssembleResult(
            mode="hant",
            conversions=[],
            changed=["b1"],
            kept="fine-tuned",
            selection={"before": {"kl": 0.3}, "after": {"kl": 0.1}},
            loss=[],
            params=90,
            macs=180,
            size_bits=2880,
        ),
        "evaluation": EvaluationResult(
            images=30,
            labelled=True,
            teacher={"top1": 91.0},
            student={"top1": 90.0},
            agreement={"argmax_agreement": 0.95, "relative_mse": 0.02, "cosine": 0.99, "kl": 0.05},
            warnings=[],
        ),
        "export": ExportResult(
            input_shape=[1, 3, 8, 8],
            max_abs_diff={"teacher": 1e-6, "student": 1e-6},
            ops={"teacher": ["Conv"], "student": ["Conv"]},
            check={"violations": 0, "unverified": 0},
            exporters={
                "teacher.onnx": "torchscript/opset17",
                "student.onnx": "torchscript/opset17",
            },
            backend="onnxruntime",
            device="cpu",
            threads=1,
            ms={"teacher": 2.0, "student": student_ms},
            sum_of_parts_ms={"teacher": 2.1, "student": 1.05},
            sizes={
                n: {"file_bytes": 1000, "initializer_bytes": 800} for n in ("teacher", "student")
            },
        ),
        "ablation": AblationResult(
            seeds=[0, 1, 2],
            rows={"full method": {"top1": [90.0, 91.0, 92.0], "kl": [0.1, 0.1, 0.1]}},
        ),
    }
    parts.update(kw)
    return ReportInputs(
        model="m", target={"name": "cpu-ort"}, bits={"bits": None}, stage_seconds={}, **parts
    )


def test_headline_error_is_the_search_table_against_the_measurement():
    rep = build_report(inputs(student_ms=1.0, predicted_ms=1.25))
    assert rep["prediction_error"] == pytest.approx(0.25)
    assert rep["additivity_error"] == pytest.approx(0.05)
    assert rep["speedup"] == pytest.approx(2.0)


def test_a_prediction_far_off_is_a_warning():
    assert build_report(inputs(predicted_ms=1.1))["warnings"] == []
    warnings = build_report(inputs(predicted_ms=2.0))["warnings"]
    assert len(warnings) == 1 and "predicted 2.000 ms" in warnings[0]


def test_a_budget_met_only_on_the_prediction_is_a_warning():
    """Budget 0.6 of the teacher: a student measured at 0.65 of it is flagged."""
    rep = build_report(inputs(student_ms=1.3, predicted_ms=1.2))
    assert any("held on the prediction only" in w for w in rep["warnings"])
    assert rep["latency_limit_ms"] == pytest.approx(1.16)


def test_counts_come_from_the_built_student_not_the_search():
    built = dict(vars(inputs().assemble), params=77)
    rep = build_report(inputs(assemble=AssembleResult(**built)))
    assert rep["student"]["params"] == 77 and rep["student"]["search_params"] == 90


def test_ablation_mean_and_std_over_seeds():
    row = build_report(inputs())["ablation"]["full method"]
    assert row["top1_mean"] == pytest.approx(91.0) and row["top1_std"] == pytest.approx(1.0)
    assert row["seeds"] == [0, 1, 2]


def test_fallback_exporters_are_listed():
    rep = build_report(inputs())
    assert rep["exporter_fallbacks"] == [
        {"module": "latency: b0 skip", "exporter": "dynamo/opset18"}
    ]


def test_markdown_and_files(tmp_path):
    rep = build_report(inputs())
    md = render_markdown(rep)
    for words in (
        "prediction error",
        "additivity error",
        "ONNX file",
        "packed at bit width",
        "± 1.00",
        "30 to evaluate",
    ):
        assert words in md, words
    assert write_report(rep, tmp_path) == ["report.json", "report.md", "blocks.png"]
    assert json.loads((tmp_path / "report.json").read_text())["splits"]["eval"] == 30
