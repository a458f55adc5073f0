"""The summary a conversion prints in the terminal: teacher vs student, one table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from archnet.report.markdown import faster, kb, latency_how, mean_std
from archnet.tasks import METRICS, decisions


def _ratio(s: float, t: float) -> str:
    return f"{s / t:.2f}" if t else "n/a"


def print_summary(rep: dict, run_dir: Path, out: Console) -> None:
    """The teacher-vs-student table every conversion ends with."""
    t, s = rep["teacher"], rep["student"]
    lat, sp = rep["latency"], rep["splits"]
    table = Table(
        title=f"archnet: {rep['model']} on {rep['target']['name']} "
        f"({lat['backend']}, {lat['threads']} thread(s), batch {lat['input_shape'][0]})"
    )
    for col, justify in (("", "left"), ("teacher", "right"), ("student", "right")):
        table.add_column(col, justify=justify)
    table.add_column("student / teacher", justify="right")
    table.add_row(
        f"latency, {latency_how(rep)} (ms)",
        f"{t['latency_ms']:.3f}",
        f"{s['latency_ms']:.3f}",
        f"{1 / rep['speedup']:.2f} ({faster(rep['speedup'])})",
    )
    table.add_row(
        "latency, search table (ms)",
        f"{t['predicted_latency_ms']:.3f}",
        f"{s['predicted_latency_ms']:.3f}",
        f"prediction error {100 * rep['prediction_error']:.1f}%",
    )
    table.add_row(
        "latency, sum of parts (ms)",
        f"{t['sum_of_parts_ms']:.3f}",
        f"{s['sum_of_parts_ms']:.3f}",
        f"additivity error {100 * rep['additivity_error']:.1f}%",
    )
    for key, label in METRICS.items():
        if key in s:
            table.add_row(
                f"{label}, {sp['eval']:,} eval images (%)",
                f"{t[key]:.2f}",
                f"{s[key]:.2f}",
                f"{s[key] - t[key]:+.2f} points",
            )
    agree = rep["agreement"]
    words, share = decisions(agree)
    table.add_row(f"{words} as teacher (%)", "", f"{100 * share:.2f}", "")
    table.add_row(
        "parameters", f"{t['params']:,}", f"{s['params']:,}", _ratio(s["params"], t["params"])
    )
    table.add_row("MACs", f"{t['macs']:,}", f"{s['macs']:,}", _ratio(s["macs"], t["macs"]))
    table.add_row(
        "size, packed at bit width (kB)",
        kb(t["size_bits"], True),
        kb(s["size_bits"], True),
        _ratio(s["size_bits"], t["size_bits"]),
    )
    table.add_row(
        "size, ONNX file (kB)",
        kb(t["onnx_file_bytes"]),
        kb(s["onnx_file_bytes"]),
        _ratio(s["onnx_file_bytes"], t["onnx_file_bytes"]),
    )
    q = rep.get("quantization")
    if q:
        table.add_row(
            "QDQ vs FP32 student (ms)",
            "",
            f"{q['qdq_student_ms']:.3f} vs {q['fp32_student_ms']:.3f}",
            faster(q["qdq_speedup_vs_fp32"]),
        )
    out.print(table)
    if q:
        bits = q["bits"] if q["bits"] != "auto" else f"auto ({q['bit_choices']})"
        storage = ", ".join(f"{n} {k}" for k, n in sorted(q["storage"].items()))
        deployed = (
            f"top-1 {q['runtime_top1']:.2f}%"
            if q.get("runtime_top1") is not None
            else f"{q['runtime_agreement']['what']} as PyTorch on "
            f"{100 * q['runtime_agreement']['share']:.1f}%"
        )
        out.print(
            f"quantized {bits}, first/last {q['first_last']}: {storage}; QDQ graph within "
            f"{q['max_abs_diff']:.2e} of PyTorch (one output step {q['output_step']:.2e}); "
            f"as onnxruntime runs it: {deployed}"
        )
    if rep.get("ablation"):
        seeds = len(next(iter(rep["ablation"].values()))["seeds"])
        abl = Table(
            title=f"Arch-Distillation ablation (same student; mean ± std over {seeds} seeds)"
        )
        for col in ("variant", "top-1 (%)", "KL from teacher"):
            abl.add_column(col, justify="left" if col == "variant" else "right")
        for label, row in rep["ablation"].items():
            abl.add_row(label, mean_std(row, "top1"), mean_std(row, "kl", ".4f"))
        out.print(abl)
    for w in rep["warnings"]:
        out.print(f"[bold yellow]warning:[/] {w}", highlight=False)
    out.print(
        f"budget {rep['budget_spec']} -> {rep['budgets']['latency_ms']:.3f} ms; "
        f"{rep['search']['pool_size']} choices, search space 10^"
        f"{rep['search']['space_log10']:.1f}; images: {sp['train']:,} train, "
        f"{sp['selection']:,} selection, {sp['eval']:,} eval; report: {run_dir / 'report.md'}"
    )
