"""report.json (machine-readable), report.md (for people) and the per-block plot of a run."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from archnet.score import spearman

if TYPE_CHECKING:
    from archnet.pipeline import Run


def _load(run: Run, name: str) -> Any:
    return json.loads(run.path(name).read_text())


def build_report(run: Run) -> dict[str, Any]:
    """Collect the run's files into one dictionary; every figure here was measured in this run."""
    done = run.state["done"]
    lat, search, scores = (
        _load(run, "latency.json"),
        _load(run, "search.json"),
        _load(run, "scores.json"),
    )
    pools = _load(run, "pool.json")
    exp, asm = done["export"], done["assemble"]
    result = search["result"]
    teacher = {
        "latency_ms": exp["teacher_ms"],
        "predicted_latency_ms": lat["teacher_predicted_ms"],
        "params": lat["teacher_params"],
        "macs": lat["teacher_macs"],
        "size_bits": lat["teacher_size_bits"],
    }
    teacher["sum_of_parts_ms"] = exp["teacher_sum_of_parts_ms"]
    student = {
        "latency_ms": exp["student_ms"],
        "sum_of_parts_ms": exp["student_sum_of_parts_ms"],
        "predicted_latency_ms": result["totals"]["latency_ms"],
        "params": int(result["totals"]["params"]),
        "macs": int(result["totals"]["macs"]),
        "size_bits": int(result["totals"]["size_bits"]),
        "kl_from_teacher": asm["after_finetune"]["kl"],
        "kl_before_finetune": asm["before_finetune"]["kl"],
    }
    if "top1" in asm["after_finetune"]:
        student["top1"] = asm["after_finetune"]["top1"]
        student["top1_before_finetune"] = asm["before_finetune"]["top1"]
        teacher["top1"] = asm["teacher"]["top1"]
    blocks = []
    for name, choice in zip(search["table"]["blocks"], result["names"], strict=False):
        row = scores[name][choice]
        blocks.append(
            {
                "block": name,
                "choice": choice,
                "latency_ms": lat["blocks"][name][choice],
                "teacher_latency_ms": lat["teacher_blocks"][name],
                "kl": row["kl"],
                "val_nmse": row["val_nmse"],
                "pool_size": len(pools[name]["choices"]),
            }
        )
    proxies = _proxy_quality(scores)
    return {
        "model": run.config.model,
        "mode": asm.get("mode", "hant"),
        "conversions": asm.get("conversions", []),
        "ablation": done.get("ablation", {}).get("rows"),
        "target": run.target.to_dict(),
        "budgets": search["budgets"],
        "budget_spec": search["budget_spec"],
        "teacher": teacher,
        "student": student,
        "speedup": exp["speedup"],
        # the additive model, parts and whole timed in the same interleaved run
        "prediction_error": _rel(exp["student_sum_of_parts_ms"], exp["student_ms"]),
        "teacher_prediction_error": _rel(exp["teacher_sum_of_parts_ms"], exp["teacher_ms"]),
        # the search-time table against now: includes the machine's drift in between
        "table_prediction_error": _rel(student["predicted_latency_ms"], student["latency_ms"]),
        "latency": {k: exp[k] for k in ("backend", "device", "threads", "input_shape")},
        "onnx": {
            k: exp[k]
            for k in (
                "teacher_max_abs_diff",
                "student_max_abs_diff",
                "student_violations",
                "student_ops",
            )
        },
        "search": {
            "pool_size": done["candidates"]["pool_size"],
            "space_log10": search["space_log10"],
            "objective": result["objective"],
            "solve_time_s": result["solve_time_s"],
            "status": result["status"],
            "pareto": [
                {"latency_ms": p["totals"]["latency_ms"], "objective": p["objective"]}
                for p in search["pareto"]
            ],
        },
        "proxies": proxies,
        "quantization": _quantization(run, exp),
        "blocks": blocks,
        "stage_seconds": {k: v.get("seconds") for k, v in done.items() if "seconds" in v},
    }


def _quantization(run: Run, exp: dict[str, Any]) -> dict[str, Any] | None:
    """Bits, storage and the QDQ export's agreement and speed against the float twin."""
    q = exp.get("quantization")
    if q is None:
        return None
    storage = Counter(f"{t['kind']} {t['bits']}-bit as {t['storage']}" for t in q["tensors"])
    cfg = run.config
    return {
        "bits": cfg.bits,
        "bit_choices": cfg.bit_choices if cfg.bits == "auto" else None,
        "first_last": cfg.first_last,
        "tensors": len(q["tensors"]),
        "storage": dict(storage),
        "output_step": q["output_step"],
        "max_abs_diff": exp["student_max_abs_diff"],
        "runtime_max_abs_diff": q["runtime_max_abs_diff"],
        "runtime_argmax_agreement": q["runtime_argmax_agreement"],
        "runtime_top1": q.get("runtime_top1"),
        "size_bits": q["size_bits"],
        "fp32_size_bits": q["fp32_size_bits"],
        "teacher_size_bits": q["teacher_size_bits"],
        "fp32_student_ms": exp["student_fp32_ms"],
        "qdq_student_ms": exp["student_ms"],
        "qdq_speedup_vs_fp32": exp["quantized_speedup"],
    }


def faster(speedup: float) -> str:
    """'2.10x faster' or '1.35x slower': a ratio below one reads badly as 'faster'."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _rel(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def _proxy_quality(scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """How well the blockwise loss and the replace-one-block KL rank candidates by accuracy.

    Spearman correlation over every trained candidate between each proxy and the top-1 of the
    teacher with that one block swapped (negative is good: lower loss, higher accuracy).
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


def render_markdown(rep: dict[str, Any]) -> str:
    t, s = rep["teacher"], rep["student"]
    lat = rep["latency"]
    lines = [
        f"# archnet conversion report: {rep['model']}",
        "",
        f"Mode: **{rep['mode']}** ("
        + (
            "HANT/LANA search + end-to-end KD"
            if rep["mode"] == "hant"
            else "Arch-Net: restricted operators, Arch-Distillation"
        )
        + ").",
        "",
        f"Target **{rep['target']['name']}**; latency on {lat['backend']} ({lat['device']}, "
        f"{lat['threads']} thread(s)), input {'x'.join(map(str, lat['input_shape']))}, teacher "
        "and student timed in the same run, interleaved.",
        f"Latency budget {rep['budget_spec']} = {rep['budgets']['latency_ms']:.3f} ms.",
        "",
        "| | teacher | student | ratio |",
        "|---|---:|---:|---:|",
        f"| measured latency (ms) | {t['latency_ms']:.3f} | {s['latency_ms']:.3f} | "
        f"{faster(rep['speedup'])} |",
        f"| sum of parts, same run (ms) | {t['sum_of_parts_ms']:.3f} | "
        f"{s['sum_of_parts_ms']:.3f} | error {100 * rep['prediction_error']:.1f}% (student) |",
        f"| predicted at search time (ms) | {t['predicted_latency_ms']:.3f} | "
        f"{s['predicted_latency_ms']:.3f} | error {100 * rep['table_prediction_error']:.1f}% "
        "(student, includes machine drift) |",
        f"| parameters | {t['params']:,} | {s['params']:,} | {s['params'] / t['params']:.2f} |",
        f"| MACs | {t['macs']:,} | {s['macs']:,} | {s['macs'] / t['macs']:.2f} |",
        f"| size (kB) | {t['size_bits'] / 8e3:,.1f} | {s['size_bits'] / 8e3:,.1f} | "
        f"{s['size_bits'] / t['size_bits']:.3f} |",
    ]
    if "top1" in s:
        lines.append(
            f"| top-1 (%) | {t['top1']:.2f} | {s['top1']:.2f} | "
            f"{s['top1'] - t['top1']:+.2f} points |"
        )
        lines.append(f"| top-1 before fine-tune (%) | | {s['top1_before_finetune']:.2f} | |")
    lines.append(f"| KL from teacher (held-out) | 0 | {s['kl_from_teacher']:.4f} | |")
    se = rep["search"]
    lines += [
        "",
        "## Search",
        "",
        f"{se['pool_size']} candidates over {len(rep['blocks'])} blocks, search space "
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
    p = rep["proxies"]
    lines += ["", "## How well the proxies predict accuracy", ""]
    if "note" in p:
        lines.append(p["note"])
    else:
        lines.append(
            f"Spearman correlation with the top-1 of the teacher with one block swapped, over "
            f"{p['candidates']} trained candidates (more negative is better): blockwise NMSE "
            f"{_fmt(p['spearman_val_nmse_vs_top1'], '.2f')}, replace-one-block KL "
            f"{_fmt(p['spearman_kl_vs_top1'], '.2f')}."
        )
    if rep.get("conversions"):
        lines += [
            "",
            "## Stem and head converted to the target's operators",
            "",
            "| module | was | now |",
            "|---|---|---|",
        ]
        lines += [f"| {n} | {a} | {b} |" for n, a, b in rep["conversions"]]
    if rep.get("ablation"):
        lines += [
            "",
            "## Ablation (Arch-Distillation, same data, same student)",
            "",
            "| variant | top-1 (%) | KL from teacher |",
            "|---|---:|---:|",
        ]
        for label, row in rep["ablation"].items():
            lines.append(f"| {label} | {_fmt(row.get('top1'), '.2f')} | {row['kl']:.4f} |")
    lines += _quantization_lines(rep.get("quantization"))
    o = rep["onnx"]
    lines += [
        "",
        "## Export",
        "",
        f"`teacher.onnx` / `student.onnx` agree with PyTorch to {o['teacher_max_abs_diff']:.1e} / "
        f"{o['student_max_abs_diff']:.1e} (max abs); student target violations: "
        f"{o['student_violations']}. Student operators: {', '.join(o['student_ops'])}.",
        "",
        "## Stage times (s)",
        "",
        "| " + " | ".join(rep["stage_seconds"]) + " |",
        "|" + "---:|" * len(rep["stage_seconds"]),
        "| " + " | ".join(f"{v:.1f}" for v in rep["stage_seconds"].values()) + " |",
        "",
    ]
    return "\n".join(lines)


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
    lines += [
        "",
        "Below 8 bits, values are held in int8/uint8 restricted to the narrower range (a Clip "
        "before each QuantizeLinear) unless the storage above says int4/uint4.",
        "",
        f"QDQ graph as written vs PyTorch fake-quant: max abs difference {q['max_abs_diff']:.2e}, "
        f"one output step {q['output_step']:.2e}. As onnxruntime deploys it (fused integer "
        f"kernels that round on their own): max abs difference "
        f"{q['runtime_max_abs_diff']:.2e}, same class on "
        f"{100 * q['runtime_argmax_agreement']:.1f}% of held-out images"
        + (f", top-1 {q['runtime_top1']:.2f}%" if q.get("runtime_top1") is not None else "")
        + f". Size {q['size_bits'] / 8e3:,.1f} kB vs {q['fp32_size_bits'] / 8e3:,.1f} kB "
        f"as FP32 ({q['fp32_size_bits'] / max(q['size_bits'], 1):.1f}x smaller).",
        "",
        "| same run | FP32 student | QDQ student | ratio |",
        "|---|---:|---:|---:|",
        f"| latency (ms) | {q['fp32_student_ms']:.3f} | {q['qdq_student_ms']:.3f} | "
        f"{faster(q['qdq_speedup_vs_fp32'])} |",
    ]
    return lines


def plot_blocks(rep: dict[str, Any], path: str) -> None:
    """Per block: teacher latency vs the chosen candidate's, labelled with the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = rep["blocks"]
    xs = range(len(blocks))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(blocks)), 4))
    ax.bar(
        [x - 0.2 for x in xs],
        [b["teacher_latency_ms"] or 0 for b in blocks],
        0.4,
        label="teacher block",
    )
    ax.bar([x + 0.2 for x in xs], [b["latency_ms"] for b in blocks], 0.4, label="chosen")
    for x, b in zip(xs, blocks, strict=False):
        ax.text(
            x + 0.2, b["latency_ms"], b["choice"], rotation=90, fontsize=7, va="bottom", ha="center"
        )
    ax.set_xticks(list(xs), [b["block"] for b in blocks], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_title("Chosen candidate per block")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run: Run) -> dict[str, Any]:
    rep = build_report(run)
    run.path("report.json").write_text(json.dumps(rep, indent=2))
    run.path("report.md").write_text(render_markdown(rep))
    plot_blocks(rep, str(run.path("blocks.png")))
    return rep
