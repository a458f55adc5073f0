"""report.md: the figures of a report, for people."""

from __future__ import annotations

from typing import Any

from archnet.tasks import METRICS, decisions


def latency_how(rep: dict) -> str:
    """How the report's latencies were obtained: timed, or a cost model's estimate."""
    return "estimated by a cost model" if rep["latency"].get("estimated") else "measured"


def faster(speedup: float) -> str:
    """'2.10x faster' or '1.35x slower': a ratio below one reads badly as 'faster'."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


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
        + (
            "and student **estimated** (bit operations and bits moved; no chip was run)."
            if lat.get("estimated")
            else "and student timed in the same run, interleaved."
        ),
        f"Latency budget {rep['budget_spec']} = {rep['budgets']['latency_ms']:.3f} ms; the "
        f"search kept the student under {rep['latency_limit_ms']:.3f} ms, leaving a margin for "
        "timing noise"
        + (
            f", divided by {rep['latency_correction']:.2f}: a first student, measured, missed "
            "the budget by more than 10% and the table's prediction was corrected by the "
            "measurement"
            if rep.get("latency_correction", 1.0) != 1.0
            else ""
        )
        + ". Measured, the student's share of the teacher's latency is "
        f"{rep['measured_over_budget']:.2f} of what the budget allows.",
        f"Images: {sp['train']:,} to train, {sp['selection']:,} to select (scores, search, "
        f"keeping the fine-tune), {sp['eval']:,} to evaluate ({sp['eval_source']}; no choice "
        "reads them).",
        "",
        "| | teacher | student | student / teacher |",
        "|---|---:|---:|---:|",
        f"| latency, {latency_how(rep)} (ms) | {t['latency_ms']:.3f} | {s['latency_ms']:.3f} | "
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
    lines += [
        f"| {label}, evaluation split (%) | {t[key]:.2f} | {s[key]:.2f} | "
        f"{s[key] - t[key]:+.2f} points |"
        for key, label in METRICS.items()
        if key in s
    ]
    a = rep["agreement"]
    words, share = decisions(a)
    lines += [
        "",
        f"Student vs teacher on the evaluation split: {words} on "
        f"{100 * share:.1f}% of images, relative MSE of outputs "
        f"{a['relative_mse']:.4f}, cosine {a['cosine']:.4f}"
        + (f", KL {a['kl']:.4f}." if "kl" in a else "."),
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
    lines += _rerank_lines(se["reranked"])
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


def _rerank_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        f"The ILP's {len(rows)} best students (each differing from every better one in half "
        "the blocks or more), each assembled and fine-tuned for one short pass; the lowest "
        "selection KL after it was chosen:",
        "",
        "| # | choices | summed score | latency, predicted (ms) | KL assembled | "
        "KL after the pass | |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for i, row in enumerate(rows, 1):
        lines.append(
            f"| {i} | {', '.join(row['names'])} | {row['objective']:.4f} | "
            f"{row['predicted_latency_ms']:.3f} | {row['kl_assembled']:.4f} | "
            f"{row['kl_recovered']:.4f} | {'chosen' if row['chosen'] else ''} |"
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
        f"Student operators (as a compiler keeps them: constants folded, aliases dropped): "
        f"{', '.join(o['student_ops'])}.",
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
        f"{q['runtime_max_abs_diff']:.2e}, {q['runtime_agreement']['what']} on "
        f"{100 * q['runtime_agreement']['share']:.1f}% of images"
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
