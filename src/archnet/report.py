"""report.json (machine-readable), report.md (for people) and the per-block plot of a run.

Pure functions of the stages' typed results (:class:`ReportInputs`), so a report can be built
and checked without a run directory. Every figure says how it was obtained: measured (timed
or counted on the built network), predicted (the search table) or packed (bits, not bytes);
docs/architecture.md has a glossary of every key.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
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
    if prediction_error > POOR_PREDICTION:
        warnings.append(
            f"the search table predicted {student['predicted_latency_ms']:.3f} ms for the "
            f"student, measured {student['latency_ms']:.3f} ms ({100 * prediction_error:.0f}% "
            "off): the budget held on the prediction only"
        )
    return {
        "model": r.model,
        "mode": asm.mode,
        "target": r.target,
        "splits": {**r.prepare.splits, "eval_source": r.prepare.eval_source},
        "budgets": r.search.budgets,
        "budget_spec": r.search.budget_spec,
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
    storage = Counter(f"{t['kind']} {t['bits']}-bit as {t['storage']}" for t in q["tensors"])
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
        "runtime_argmax_agreement": q["runtime_argmax_agreement"],
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


def faster(speedup: float) -> str:
    """'2.10x faster' or '1.35x slower': a ratio below one reads badly as 'faster'."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


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


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def mean_std(row: dict[str, Any], metric: str, spec: str = ".2f") -> str:
    """'90.12 ± 0.31' from a report row's ``metric_mean`` / ``metric_std``."""
    if f"{metric}_mean" not in row:
        return "n/a"
    return f"{row[f'{metric}_mean']:{spec}} ± {row[f'{metric}_std']:{spec}}"


def kb(bits_or_bytes: float, bits: bool = False) -> str:
    return f"{bits_or_bytes / (8e3 if bits else 1e3):,.1f}"


def render_markdown(rep: dict[str, Any]) -> str:
    t, s = rep["teacher"], rep["student"]
    lat, sp = rep["latency"], rep["splits"]
    lines = [f"# archnet conversion report: {rep['model']}", ""]
    lines += [f"> **Warning:** {w}" for w in rep["warnings"]] + ([""] if rep["warnings"] else [])
    mode = (
        "HANT/LANA search + end-to-end KD"
        if rep["mode"] == "hant"
        else "Arch-Net: restricted operators, Arch-Distillation"
    )
    lines += [
        f"Mode: **{rep['mode']}** ({mode}).",
        "",
        f"Target **{rep['target']['name']}**; latency on {lat['backend']} ({lat['device']}, "
        f"{lat['threads']} thread(s)), input {'x'.join(map(str, lat['input_shape']))}, teacher "
        "and student timed in the same run, interleaved.",
        f"Latency budget {rep['budget_spec']} = {rep['budgets']['latency_ms']:.3f} ms.",
        f"Images: {sp['train']:,} to train, {sp['selection']:,} to select (scores, search, "
        f"keeping the fine-tune), {sp['eval']:,} to evaluate ({sp['eval_source']}; no choice "
        "reads them).",
        "",
        "| | teacher | student | student / teacher |",
        "|---|---:|---:|---:|",
        f"| latency, measured (ms) | {t['latency_ms']:.3f} | {s['latency_ms']:.3f} | "
        f"{faster(rep['speedup'])} |",
        f"| latency, predicted by the search table (ms) | {t['predicted_latency_ms']:.3f} | "
        f"{s['predicted_latency_ms']:.3f} | prediction error {100 * rep['prediction_error']:.1f}% |",
        f"| latency, sum of parts timed in the same run (ms) | {t['sum_of_parts_ms']:.3f} | "
        f"{s['sum_of_parts_ms']:.3f} | additivity error {100 * rep['additivity_error']:.1f}% |",
        f"| parameters (built network) | {t['params']:,} | {s['params']:,} | "
        f"{s['params'] / t['params']:.2f} |",
        f"| MACs (built network) | {t['macs']:,} | {s['macs']:,} | {s['macs'] / t['macs']:.2f} |",
        f"| size, packed at bit width (kB) | {kb(t['size_bits'], True)} | "
        f"{kb(s['size_bits'], True)} | {s['size_bits'] / t['size_bits']:.3f} |",
        f"| size, ONNX file (kB) | {kb(t['onnx_file_bytes'])} | {kb(s['onnx_file_bytes'])} | "
        f"{s['onnx_file_bytes'] / t['onnx_file_bytes']:.3f} |",
    ]
    if "top1" in s:
        lines.append(
            f"| top-1, evaluation split (%) | {t['top1']:.2f} | {s['top1']:.2f} | "
            f"{s['top1'] - t['top1']:+.2f} points |"
        )
    a = rep["agreement"]
    lines += [
        "",
        f"Student vs teacher on the evaluation split: same class on "
        f"{100 * a['argmax_agreement']:.1f}% of images, relative MSE of outputs "
        f"{a['relative_mse']:.4f}, cosine {a['cosine']:.4f}, KL {a['kl']:.4f}.",
    ]
    e2e = rep["end_to_end"]
    lines.append(
        f"End-to-end stage: selection KL {e2e['selection_kl_before']:.4f} before, "
        f"{e2e['selection_kl_after']:.4f} after; kept the "
        + ("fine-tuned student." if e2e["kept"] == "fine-tuned" else "student as assembled.")
    )
    lines += _search_lines(rep) + _conversion_lines(rep) + _ablation_lines(rep.get("ablation"))
    lines += _quantization_lines(rep.get("quantization")) + _export_lines(rep)
    return "\n".join(lines)


def _search_lines(rep: dict[str, Any]) -> list[str]:
    se = rep["search"]
    lines = [
        "",
        "## Search",
        "",
        f"{se['pool_size']} choices over {len(rep['blocks'])} blocks, search space "
        f"10^{se['space_log10']:.1f}; ILP {se['status']} in {se['solve_time_s']:.3f} s, "
        f"summed score {se['objective']:.4f}. Pareto front: `pareto.png`.",
        "",
        "| block | choice | latency (ms) | teacher block (ms) | KL (swap) | val NMSE | pool |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for b in rep["blocks"]:
        lines.append(
            f"| {b['block']} | {b['choice']} | {b['latency_ms']:.4f} | "
            f"{_fmt(b['teacher_latency_ms'], '.4f')} | {b['kl']:.4f} | {b['val_nmse']:.4f} | "
            f"{b['pool_size']} |"
        )
    for name, why in rep["unserved_blocks"].items():
        lines.append(f"\nBlock {name} stays the teacher's: {why}.")
    p = rep["proxies"]
    lines += ["", "## How well the proxies predict accuracy", ""]
    if "note" in p:
        lines.append(p["note"])
    else:
        lines.append(
            f"Spearman correlation with the top-1 of the teacher with one block swapped "
            f"(evaluation split), over {p['candidates']} trained candidates (more negative is "
            f"better): blockwise NMSE {_fmt(p['spearman_val_nmse_vs_top1'], '.2f')}, "
            f"replace-one-block KL {_fmt(p['spearman_kl_vs_top1'], '.2f')}."
        )
    return lines


def _conversion_lines(rep: dict[str, Any]) -> list[str]:
    if not rep.get("conversions"):
        return []
    lines = ["", "## Stem and head converted to the target's operators", ""]
    lines += ["| module | was | now |", "|---|---|---|"]
    return lines + [f"| {n} | {a} | {b} |" for n, a, b in rep["conversions"]]


def _ablation_lines(ab: dict[str, Any] | None) -> list[str]:
    if not ab:
        return []
    seeds = next(iter(ab.values()))["seeds"]
    lines = [
        "",
        f"## Ablation (Arch-Distillation, same student, mean ± std over {len(seeds)} seeds)",
        "",
        "| variant | top-1 (%) | KL from teacher |",
        "|---|---:|---:|",
    ]
    for label, row in ab.items():
        lines.append(f"| {label} | {mean_std(row, 'top1')} | {mean_std(row, 'kl', '.4f')} |")
    return lines


def _export_lines(rep: dict[str, Any]) -> list[str]:
    o = rep["onnx"]
    diffs = ", ".join(f"`{n}.onnx` {v:.1e}" for n, v in o["max_abs_diff"].items())
    lines = [
        "",
        "## Export",
        "",
        f"ONNX vs PyTorch, max abs difference: {diffs}. Student target check: "
        f"{o['student_violations']} violations, {o['student_unverified']} unverified nodes. "
        f"Student operators: {', '.join(o['student_ops'])}.",
    ]
    fallbacks = rep["exporter_fallbacks"]
    if fallbacks:
        lines.append(
            "Exported by a fallback exporter: "
            + "; ".join(f"{f['module']} ({f['exporter']})" for f in fallbacks)
            + "."
        )
    secs = rep["stage_seconds"]
    lines += [
        "",
        "## Stage times (s)",
        "",
        "| " + " | ".join(secs) + " |",
        "|" + "---:|" * len(secs),
        "| " + " | ".join(f"{v:.1f}" for v in secs.values()) + " |",
        "",
    ]
    return lines


def _quantization_lines(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    bits = q["bits"] if q["bits"] != "auto" else f"chosen per block among {q['bit_choices']}"
    lines = [
        "",
        "## Quantization",
        "",
        f"Bits {bits}; first and last layer {q['first_last']}. Batch norm folded, LSQ "
        "fake-quantization trained blockwise and end to end; exported as QDQ ONNX "
        "(`student.onnx`), the float twin as `student_fp32.onnx`.",
        "",
        "| tensors | count |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(q["storage"].items())]
    if q["containers_wider_than_bits"]:
        lines += [
            "",
            "Some values sit in containers wider than their bits (the storage column): the "
            "ONNX file holds them at the container's width, narrowed by a Clip before each "
            "QuantizeLinear; the packed size counts them at their bits.",
        ]
    lines += [
        "",
        f"QDQ graph as written vs PyTorch fake-quant: max abs difference {q['max_abs_diff']:.2e}, "
        f"one output step {q['output_step']:.2e}. As onnxruntime deploys it (fused integer "
        f"kernels that round on their own), on the evaluation split: max abs difference "
        f"{q['runtime_max_abs_diff']:.2e}, same class on "
        f"{100 * q['runtime_argmax_agreement']:.1f}% of images"
        + (f", top-1 {q['runtime_top1']:.2f}%" if q.get("runtime_top1") is not None else "")
        + f". Size packed at bit width {kb(q['size_bits'], True)} kB vs "
        f"{kb(q['fp32_size_bits'], True)} kB as FP32; ONNX file {kb(q['onnx_file_bytes'])} kB "
        f"vs {kb(q['fp32_onnx_file_bytes'])} kB.",
        "",
        "| same run | FP32 student | QDQ student | ratio |",
        "|---|---:|---:|---:|",
        f"| latency (ms) | {q['fp32_student_ms']:.3f} | {q['qdq_student_ms']:.3f} | "
        f"{faster(q['qdq_speedup_vs_fp32'])} |",
    ]
    return lines


def plot_blocks(rep: dict[str, Any], path: Path) -> None:
    """Per block: teacher latency vs the chosen candidate's, labelled with the choice."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = rep["blocks"]
    xs = range(len(blocks))
    fig = Figure(figsize=(max(6, 0.6 * len(blocks)), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(
        [x - 0.2 for x in xs],
        [b["teacher_latency_ms"] or 0 for b in blocks],
        0.4,
        label="teacher block",
    )
    ax.bar([x + 0.2 for x in xs], [b["latency_ms"] for b in blocks], 0.4, label="chosen")
    for x, b in zip(xs, blocks):
        ax.text(
            x + 0.2, b["latency_ms"], b["choice"], rotation=90, fontsize=7, va="bottom", ha="center"
        )
    ax.set_xticks(list(xs), [b["block"] for b in blocks], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("latency, measured in the latency stage (ms)")
    ax.set_title("Chosen candidate per block")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(rep: dict[str, Any], out_dir: Path) -> list[str]:
    """report.json, report.md and blocks.png in ``out_dir``; returns the file names."""
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2))
    (out_dir / "report.md").write_text(render_markdown(rep))
    plot_blocks(rep, out_dir / "blocks.png")
    return ["report.json", "report.md", "blocks.png"]
