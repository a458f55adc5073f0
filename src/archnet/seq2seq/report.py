"""``report.md``, ``report.json`` and plots of a translation run: the stages' records, in one
place, every figure labelled as measured or predicted (see docs/architecture.md, glossary)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from archnet.store import write_json

__all__ = ["write_report"]


def _plot_bleu(scores: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = list(scores)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [scores[k]["bleu"] for k in labels], 0.4, label="BLEU")
    ax.bar([x + 0.2 for x in xs], [scores[k]["chrf"] for k in labels], 0.4, label="chrF")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("test split (sacrebleu)")
    ax.set_title("Teacher and students on the test split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_training(histories: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    for label, h in histories.items():
        if h.get("stages"):
            ax.plot(range(1, len(h["stages"]) + 1), h["stages"], marker="o", label=label)
    ax.set_xlabel("stage (progressive targets, then final)")
    ax.set_ylabel("mean training loss")
    ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    for label, h in histories.items():
        if h.get("final_kd"):
            ax.plot(h["final_kd"], marker=".", label=f"{label}: token KL")
        if h.get("finetune_loss"):
            ax.plot(h["finetune_loss"], marker=".", label=f"{label}: fine-tune KL + CE")
    ax.set_xlabel("final stage, tenths")
    ax.set_ylabel("final-stage loss")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_report(run, log: Callable[[str], None]) -> dict:
    """Gather the stage records of ``run`` into report.json / report.md (+ PNG plots)."""
    cfg = run.config
    prepared = run.record("prepare")
    student = run.record("student")
    quant = run.record("quantize")
    evaluation = run.record("evaluate")
    export = run.record("export")
    scores = evaluation["scores"]
    report = {
        "task": "translation",
        "method": student["method"],
        "target": cfg.target,
        "bits": cfg.bit_list,
        "splits": prepared["splits"],
        "corpus": prepared["corpus"],
        "teacher": {k: prepared[k] for k in ("teacher_params", "vocab", "layers", "width")},
        "student_params": student["student_params"],
        "decoding": evaluation["decoding"],
        "scores": scores,
        "export": export,
        "stage_seconds": {
            name: run.record(name)["seconds"]
            for name in ("prepare", "student", "quantize", "evaluate", "export")
        },
    }
    if "search" in student:
        report["search"] = student["search"]
    histories = {"fp32": student.get("history", {})}
    histories |= {k: v["history"] for k, v in quant["quantized"].items()}
    _plot_bleu(scores, run.path("bleu.png"))
    if any(
        h.get("stages") or h.get("final_kd") or h.get("finetune_loss") for h in histories.values()
    ):
        _plot_training(histories, run.path("training.png"))
    write_json(run.path("report.json"), report)
    run.path("report.md").write_text(_markdown(report, run), encoding="utf-8")
    log(f"report: {run.path('report.md')}")
    return {"files": ["report.md", "report.json", "bleu.png", "training.png"]}


def _markdown(rep: dict, run) -> str:
    t = rep["teacher"]
    lines = [
        f"# Translation conversion: {rep['method']} on {rep['target']}",
        "",
        f"Teacher: {t['layers'][0]}+{t['layers'][1]} layers, width {t['width']}, vocabulary "
        f"{t['vocab']}, {t['teacher_params'] / 1e6:.2f}M parameters. Corpus {rep['corpus']}: "
        f"{rep['splits']['train']} training sources (of {rep['splits']['train_available']}; "
        f"their references never read), {rep['splits']['selection']} selection pairs, "
        f"{rep['splits']['test']} test pairs (scored once, no choice made on them).",
        "",
        f"## Test split ({rep['decoding']} decoding)",
        "",
        _row(["model", "BLEU", "chrF", "BLEU drop", "same text as teacher"]),
        _row(["---"] * 5),
    ]
    for label, s in rep["scores"].items():
        drop = f"{s['bleu_drop']:.2f}" if "bleu_drop" in s else ""
        same = f"{s['same_as_teacher']:.1f}%" if "same_as_teacher" in s else ""
        lines.append(_row([label, f"{s['bleu']:.2f}", f"{s['chrf']:.2f}", drop, same]))
    teacher = next(iter(rep["scores"].values()))
    lines += ["", f"sacrebleu: `{teacher['bleu_signature']}`, `{teacher['chrf_signature']}`", ""]
    lines += _export_lines(rep["export"])
    if "search" in rep:
        lines += _search_lines(rep["search"])
    lines += [
        "",
        "![BLEU](bleu.png)",
        "",
        "![training](training.png)" if run.path("training.png").is_file() else "",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in rep["stage_seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def _export_lines(export: dict) -> list[str]:
    lines = ["## Export and latency (measured in one run)", ""]
    models = export.get("models", {})
    if not models:
        return lines + ["(no export)", ""]
    lines += [
        _row(
            ["model", "violations", "ops", "ORT tokens = PyTorch", "translation ms", "steps"]
            + ["speedup"]
        ),
        _row(["---"] * 7),
    ]
    for label, m in models.items():
        lines.append(
            _row(
                [
                    label,
                    m.get("violations", ""),
                    ", ".join(m.get("ops", [])),
                    m.get("tokens_match", ""),
                    f"{m['translation_ms']:.1f}" if "translation_ms" in m else "",
                    m.get("steps", ""),
                    f"{m['speedup']:.2f}x" if "speedup" in m else "",
                ]
            )
        )
    return lines + [""]


def _search_lines(search: dict) -> list[str]:
    lines = ["## HANT search", ""]
    lines.append(f"- choice: {', '.join(search['choice'])}")
    if search.get("budget_fraction") is not None:
        lines.append(f"- budget: {search['budget_fraction']} of the teacher's measured latency")
    tried = search.get("calibration") or []
    if tried:
        n, steps = search["calibration_batch"]
        lines += [
            "",
            f"Choices timed against the teacher while searching ({n} selection sentences, "
            f"{steps} decoding steps, interleaved rounds; ratio = student / teacher):",
            "",
            _row(["predicted budget", "choice", "predicted ratio", "measured ratio", "kept"]),
            _row(["---"] * 5),
        ]
        for t in tried:
            lines.append(
                _row(
                    [
                        f"{t['budget_predicted']:.3f}",
                        ", ".join(t["choice"]),
                        f"{t['predicted_ratio']:.3f}",
                        f"{t['measured_ratio']:.3f}",
                        "yes" if t.get("kept") else "",
                    ]
                )
            )
    return lines + [""]
