"""Every reported figure, built from the stages' typed results (:class:`ReportInputs`).

A pure function: a report can be built and checked without a run directory. Every figure says
how it was obtained: measured (timed or counted on the built network), predicted (the search
table) or packed (bits, not bytes); docs/architecture.md has a glossary of every key.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

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
from archnet.score import spearman
from archnet.targets.latency import BACKENDS

# a latency prediction this far off the measurement is flagged in the report
POOR_PREDICTION = 0.25


@dataclass
class ReportInputs:
    """Everything a report is made of: the settings and each stage's result."""

    model: str
    target: dict[str, Any]
    bits: dict[str, Any]  # bits, bit_choices, first_last as configured
    prepare: PrepareResult
    pool: PoolResult
    latency: LatencyTable
    scores: ScoreResult
    search: SearchOutcome
    assemble: AssembleResult
    evaluation: EvaluationResult
    export: ExportResult
    ablation: AblationResult | None
    stage_seconds: dict[str, float]
    latency_correction: float = 1.0  # see ConvertConfig.latency_correction


def build_report(r: ReportInputs) -> dict[str, Any]:
    """One dictionary of every reported figure."""
    lat, exp, ev, asm = r.latency, r.export, r.evaluation, r.assemble
    totals = r.search.result["totals"]
    teacher = {
        "latency_ms": exp.ms["teacher"],
        "sum_of_parts_ms": exp.sum_of_parts_ms["teacher"],
        "predicted_latency_ms": lat.teacher_predicted_ms,
        "params": lat.teacher_params,
        "macs": lat.teacher_macs,
        "size_bits": lat.teacher_size_bits,
        **_onnx_size(exp, "teacher"),
        **ev.teacher,
    }
    student = {
        "latency_ms": exp.ms["student"],
        "sum_of_parts_ms": exp.sum_of_parts_ms["student"],
        "predicted_latency_ms": totals["latency_ms"],
        "params": asm.params,
        "macs": asm.macs,
        "size_bits": asm.size_bits,
        "search_params": int(totals["params"]),
        "search_macs": int(totals["macs"]),
        "search_size_bits": int(totals["size_bits"]),
        **_onnx_size(exp, "student"),
        **ev.student,
    }
    prediction_error = _rel(student["predicted_latency_ms"], student["latency_ms"])
    warnings = list(ev.warnings)
    budget = r.search.budgets["latency_ms"]
    measured_ratio = student["latency_ms"] / teacher["latency_ms"]
    if measured_ratio > budget / lat.teacher_predicted_ms:
        warnings.append(
            f"measured, the student takes {measured_ratio:.3f} of the teacher's time; the budget "
            f"allowed {budget / lat.teacher_predicted_ms:.3f}: it held on the prediction only"
        )
    if prediction_error > POOR_PREDICTION:
        warnings.append(
            f"the search table predicted {student['predicted_latency_ms']:.3f} ms for the "
            f"student, measured {student['latency_ms']:.3f} ms ({100 * prediction_error:.0f}% "
            "off): the latency table does not describe this student well"
        )
    return {
        "model": r.model,
        "mode": asm.mode,
        "target": r.target,
        "splits": {**r.prepare.splits, "eval_source": r.prepare.eval_source},
        "budgets": r.search.budgets,
        "budget_spec": r.search.budget_spec,
        # the measured student/teacher ratio over the ratio the budget allows (> 1: missed)
        "measured_over_budget": measured_ratio / (budget / lat.teacher_predicted_ms),
        "latency_correction": r.latency_correction,
        "latency_limit_ms": r.search.limits["latency_ms"],
        "teacher": teacher,
        "student": student,
        "speedup": teacher["latency_ms"] / student["latency_ms"],
        "prediction_error": prediction_error,
        "additivity_error": _rel(student["sum_of_parts_ms"], student["latency_ms"]),
        "teacher_additivity_error": _rel(teacher["sum_of_parts_ms"], teacher["latency_ms"]),
        "agreement": ev.agreement,
        "end_to_end": {
            "kept": asm.kept,
            "selection_kl_before": asm.selection["before"]["kl"],
            "selection_kl_after": asm.selection["after"]["kl"],
            "batchnorm_reestimated_in": asm.changed,
        },
        "conversions": asm.conversions,
        "latency": {
            "backend": exp.backend,
            "estimated": BACKENDS[exp.backend].estimated,
            "device": exp.device,
            "threads": exp.threads,
            "input_shape": exp.input_shape,
        },
        "onnx": {
            "max_abs_diff": exp.max_abs_diff,
            "student_violations": exp.check["violations"],
            "student_unverified": exp.check["unverified"],
            "student_ops": exp.ops["student"],
            "exporters": exp.exporters,
        },
        "exporter_fallbacks": _fallbacks(lat, exp),
        "search": {
            "pool_size": r.pool.pool_size,
            "space_log10": r.pool.space_log10,
            "objective": r.search.result["objective"],
            "solve_time_s": r.search.result["solve_time_s"],
            "status": r.search.result["status"],
            "pareto": [
                {"latency_ms": p["totals"]["latency_ms"], "objective": p["objective"]}
                for p in r.search.pareto
            ],
            "reranked": [
                {**row, "chosen": row["names"] == r.search.names} for row in r.search.reranked
            ],
        },
        "unserved_blocks": r.pool.unserved,
        "proxies": _proxy_quality(r.scores.scores),
        "quantization": _quantization(r.bits, exp, student),
        "ablation": _ablation(r.ablation),
        "blocks": _blocks(r),
        "warnings": warnings,
        "stage_seconds": r.stage_seconds,
    }


def _onnx_size(exp: ExportResult, name: str) -> dict[str, int]:
    size = exp.sizes[name]
    return {
        "onnx_file_bytes": size["file_bytes"],
        "onnx_initializer_bytes": size["initializer_bytes"],
    }


def _blocks(r: ReportInputs) -> list[dict[str, Any]]:
    out = []
    for name, choice in zip(r.search.table["blocks"], r.search.names):
        row = r.scores.scores[name][choice]
        out.append(
            {
                "block": name,
                "choice": choice,
                "latency_ms": r.latency.blocks[name][choice],
                "teacher_latency_ms": r.latency.teacher_blocks[name],
                "kl": row["kl"],
                "val_nmse": row["val_nmse"],
                "pool_size": len(r.pool.pools[name]["choices"]),
            }
        )
    return out


def _fallbacks(lat: LatencyTable, exp: ExportResult) -> list[dict[str, str]]:
    """Every module not exported by the first exporter archnet tries, with the one used."""
    from archnet.onnx_utils import export_chain

    first = export_chain()[0]
    found = {f"export: {name}": how for name, how in exp.exporters.items()}
    for part, tags in lat.exporters.items():
        if isinstance(tags, dict):  # per block (and choice)
            for block, tag in tags.items():
                pairs = tag.items() if isinstance(tag, dict) else [("", tag)]
                found.update({f"latency: {block} {c}".strip(): t for c, t in pairs})
        else:
            found[f"latency: {part}"] = tags
    return [
        {"module": m, "exporter": how}
        for m, how in found.items()
        if how not in (first, "eager", "external")
    ]


def _quantization(
    bits: dict[str, Any], exp: ExportResult, student: dict[str, Any]
) -> dict[str, Any] | None:
    """Bits, storage and the QDQ export's agreement and speed against the float twin."""
    q = exp.quantization
    if q is None:
        return None
    storage = Counter(
        f"{t['kind']} {t['bits']}-bit as {t['storage']}"
        + (" with a zero point" if t.get("zero_point") else "")
        for t in q["tensors"]
    )
    return {
        **bits,
        "tensors": len(q["tensors"]),
        "storage": dict(storage),
        "containers_wider_than_bits": any(
            t["bits"] < int("".join(c for c in t["storage"] if c.isdigit())) for t in q["tensors"]
        ),
        "output_step": q["output_step"],
        "max_abs_diff": exp.max_abs_diff["student"],
        "runtime_max_abs_diff": q["runtime_max_abs_diff"],
        "runtime_agreement": q["runtime_agreement"],
        "runtime_top1": q["runtime_top1"],
        "size_bits": q["size_bits"],
        "fp32_size_bits": q["fp32_size_bits"],
        "onnx_file_bytes": student["onnx_file_bytes"],
        "fp32_onnx_file_bytes": exp.sizes["student_fp32"]["file_bytes"],
        "fp32_student_ms": exp.ms["student_fp32"],
        "qdq_student_ms": exp.ms["student"],
        "qdq_speedup_vs_fp32": exp.ms["student_fp32"] / exp.ms["student"],
    }


def _ablation(ab: AblationResult | None) -> dict[str, Any] | None:
    """Per variant: each metric's values over the seeds, their mean and standard deviation."""
    if ab is None or ab.skipped:
        return None
    out = {}
    for variant, metrics in ab.rows.items():
        row: dict[str, Any] = {"seeds": ab.seeds}
        for metric, values in metrics.items():
            row[metric] = values
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[variant] = row
    return out


def _rel(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def _proxy_quality(scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """How well the blockwise loss and the replace-one-block KL rank candidates by accuracy.

    Spearman correlation over every trained candidate between each proxy and the top-1 of the
    teacher with that one block swapped, on the evaluation split (negative is good: lower
    loss, higher accuracy). It measures the proxies; no choice reads it.
    """
    rows = [r for b in scores.values() for n, r in b.items() if n != "teacher" and "top1" in r]
    if not rows:
        return {"note": "no labelled evaluation data: proxy quality not measured"}
    acc = [r["top1"] for r in rows]
    return {
        "candidates": len(rows),
        "spearman_val_nmse_vs_top1": spearman([r["val_nmse"] for r in rows], acc),
        "spearman_kl_vs_top1": spearman([r["kl"] for r in rows], acc),
    }
