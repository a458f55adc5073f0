"""Arch-Net mode on timm families (random weights, tiny inputs, minimal training) under a
latency budget that binds: does every student export with zero violations of the target, run
in onnxruntime, and measure within its budget (measured / budget at most 1.10)? Where the
budget asked for is below the fastest student the search can build, the family is converted at
1.2x that fastest student's predicted latency instead (still binding: the most accurate student
is slower), and the budget column says what was used.

    python bench/bench_archnet_timm.py                     # every family the plan accepts
    python bench/bench_archnet_timm.py --models vgg11 dpn48b --budget 0.6

The families are archnet.zoo.timm_families (the list tests/test_plan.py pins); a family
refused on the way (no blocks, glue the target cannot run, an infeasible budget) is listed
with the start of its refusal, and the next one goes on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnx
import timm
import torch
from rich.console import Console
from rich.table import Table

from archnet import ConvertConfig, convert, load_target
from archnet.errors import ArchnetError
from archnet.onnx_utils import ort_session
from archnet.search import InfeasibleBudget
from archnet.targets import check_model
from archnet.zoo.timm_families import CONVERTIBLE

COLUMNS = (
    "model",
    "blocks",
    "teacher ms",
    "student ms",
    "budget ms",
    "measured/budget",
    "correction",
    "violations",
    "ORT runs",
    "seconds",
)
WITHIN = 1.10  # the share of its budget a student may measure (timing noise, prediction error)
# where --budget is below the fastest student (restricted 3x3 students of depthwise teachers
# are slower than their teachers on a CPU), the budget is this much above the fastest one
LIFT = 1.2


def tiny_config(name: str) -> ConvertConfig:
    """Minimal training: one blockwise epoch, a quarter epoch per progressive stage."""
    cfg = ConvertConfig(model=f"timm:{name}", candidates="archnet_*", selection_fraction=0.25)
    cfg.blockwise.epochs, cfg.blockwise.batch_size = 1, 16
    cfg.arch.epochs_per_stage, cfg.arch.global_epochs, cfg.arch.batch_size = 0.25, 1, 16
    cfg.latency.repeats = 20
    return cfg


def convert_one(name: str, a: argparse.Namespace, root: Path) -> dict:
    """One family converted and checked: the row's figures, read from its report.json."""
    torch.manual_seed(0)
    teacher = timm.create_model(name, pretrained=False, num_classes=10).eval()
    images = torch.randn(a.images, 3, a.size, a.size)
    t0 = time.perf_counter()

    def convert_at(budget: str):
        return convert(
            teacher,
            images,
            target=a.target,
            budget=budget,
            out=root / name,
            config=tiny_config(name),
            resume=True,
        )

    try:
        result = convert_at(a.budget)
    except InfeasibleBudget as e:  # below the fastest student: a budget just above it binds
        if e.cost != "latency_ms":
            raise
        result = convert_at(f"{e.minimum * LIFT:.4f}ms")
    run, rep = result.run_dir, result.report
    student = onnx.load(str(run / "student.onnx"))
    out = ort_session(student).run(None, {"input": images[:1].numpy()})[0]
    return {
        "model": name,
        "blocks": len(rep["blocks"]),
        "teacher_ms": rep["teacher"]["latency_ms"],
        "student_ms": rep["student"]["latency_ms"],
        "budget_ms": rep["budgets"]["latency_ms"],
        "measured_over_budget": rep["measured_over_budget"],
        "latency_correction": rep["latency_correction"],
        "violations": len(check_model(student, load_target(a.target))),
        "ort_runs": tuple(out.shape) == (1, 10),
        "seconds": time.perf_counter() - t0,
    }


def row(r: dict) -> list[str]:
    ratio = f"{r['measured_over_budget']:.2f}"
    return [
        r["model"],
        str(r["blocks"]),
        f"{r['teacher_ms']:.2f}",
        f"{r['student_ms']:.2f}",
        f"{r['budget_ms']:.2f}",
        ratio if r["measured_over_budget"] <= WITHIN else f"[red]{ratio}[/]",
        f"{r['latency_correction']:.2f}",
        str(r["violations"]),
        "yes" if r["ort_runs"] else "no",
        f"{r['seconds']:.0f}",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=CONVERTIBLE)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--target", default="archnet-5op")
    p.add_argument(
        "--budget", default="0.7", help="latency budget: a fraction of the teacher's, or '2ms'"
    )
    p.add_argument("--out", default=None, help="keep run directories here (default: temporary)")
    a = p.parse_args()
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="archnet-bench-"))
    rows, refused = [], {}
    for name in a.models:
        try:
            rows.append(convert_one(name, a, root))
        except ArchnetError as e:  # refused: say why and go on
            refused[name] = " ".join(str(e).split())[:160]
    table = Table(
        title=f"Arch-Net mode on timm families ({a.size}x{a.size}, {a.images} random images, "
        f"target {a.target}, latency budget {a.budget})"
    )
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(*row(r))
    Console(width=200).print(table)
    good = [
        r
        for r in rows
        if r["violations"] == 0 and r["ort_runs"] and r["measured_over_budget"] <= WITHIN
    ]
    print(
        f"converted {len(rows)}/{len(a.models)} ({100 * len(rows) / len(a.models):.0f}%), "
        f"{len(good)} with zero violations, running in onnxruntime and within {WITHIN:.2f} of "
        "the budget; refused: "
        + ("; ".join(f"{n} ({why})" for n, why in refused.items()) or "none")
    )
    (root / "bench.json").write_text(json.dumps({"rows": rows, "refused": refused}, indent=1))
    print(f"run directories and bench.json: {root}")


if __name__ == "__main__":
    main()
