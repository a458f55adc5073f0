"""Quantization baselines against archnet on the demo teacher: one table of top-1, latency, size.

Rows: the FP32 teacher; onnxruntime's static int8 post-training quantization (W8A8); plain LSQ
quantization-aware fine-tuning of the whole teacher, label-free (logit KD only), at each bit
setting; and archnet's quantized conversion at each bit setting. Top-1 is measured on the
held-out labelled digits by running each model's ONNX export in onnxruntime; every ONNX model
is timed in one interleaved run on the cpu-ort target's backend (onnxruntime, CPU, 1 thread),
so the latency ratios come from the same run. Size is the weights at their bit width.

    python bench/bench_quant.py                        # full settings (tens of minutes)
    python bench/bench_quant.py --fast --skip-ours     # baselines only, a few minutes
    python bench/bench_quant.py --bits w4a4 --out runs/bench_quant
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import onnx
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from torch import nn

from archnet.demo import demo_config
from archnet.onnx_utils import export_onnx
from archnet.quant import export_any, export_qdq, is_quantized, model_size_bits, parse_bits
from archnet.quant.baselines import lsq_qat, onnx_size_bits, onnx_top1, ptq_onnxruntime
from archnet.targets import load_target
from archnet.zoo import demo_teacher, evaluate

TARGET = "cpu-ort"
console = Console()


def load_teacher(out: Path, fast: bool, seed: int) -> tuple[nn.Module, Any, Any]:
    """The demo teacher and its digits split, reused from ``out`` when an earlier run saved them.

    Same files and training call as ``archnet demo``, so ``--out`` may point at a demo's folder.
    """
    teacher_file, data_file = out / "teacher_trained.pt", out / "digits_split.pt"
    if teacher_file.exists() and data_file.exists():
        console.print(f"[bold]teacher[/] reusing {teacher_file}")
        teacher = torch.load(teacher_file, map_location="cpu", weights_only=False)
        train, heldout = torch.load(data_file, weights_only=False)
    else:
        console.print("[bold]teacher[/] training tiny_effnet on digits (labels used only here)")
        teacher, train, heldout = demo_teacher(seed=seed, epochs=2 if fast else None, progress=True)
        torch.save(teacher, teacher_file)
        torch.save((train, heldout), data_file)
    return teacher.eval(), train, heldout


def has_qdq(proto: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in proto.graph.node)


def input_shape_of(proto: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim)


def run_ours(
    teacher: nn.Module, train: Any, heldout: Any, bits: str, args: argparse.Namespace
) -> tuple[nn.Module, onnx.ModelProto, Path]:
    """archnet's conversion at ``bits``; returns (student, its QDQ ONNX at the bench shape, run)."""
    from archnet.pipeline import convert

    cfg = demo_config(args.fast, TARGET, bits=bits)  # the demo's quantized settings
    cfg.first_last = args.first_last
    if args.budget is not None:
        cfg.budget = args.budget
    result = convert(
        teacher,
        train.images,  # unlabeled: the conversion never sees a label
        target=TARGET,
        budget=cfg.budget,
        out=args.out / f"ours-{bits}",
        eval_data=heldout,
        resume=True,
        config=cfg,
    )
    student = result.student.eval()
    onnx_file = result.run_dir / "student.onnx"
    proto = onnx.load(str(onnx_file)) if onnx_file.exists() else None
    usable = (
        proto is not None
        and input_shape_of(proto) == args.shape
        and (has_qdq(proto) or not is_quantized(student))
    )
    if not usable:  # e.g. exported at another batch size: export the same student here
        proto = export_any(student, args.shape)
    return student, proto, result.run_dir


def fmt_row(r: dict[str, Any], teacher: dict[str, Any]) -> list[str]:
    drop = teacher["top1"] - r["top1"]
    return [
        r["method"],
        r["bits"],
        f"{r['top1']:.2f}",
        "-" if r is teacher else f"{drop:+.2f}",
        f"{r['latency_ms']:.3f}",
        f"{r['latency_ms'] / teacher['latency_ms']:.2f}x",
        f"{r['size_kb']:.1f}",
    ]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ["method", "bits", "top-1 %", "drop (pts)", "ORT ms", "vs teacher", "size KB"]
    teacher = rows[0]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt_row(r, teacher)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_quant"))
    p.add_argument("--fast", action="store_true", help="fewer epochs and timing repeats")
    p.add_argument("--bits", default="w8a8,w4a4,w2a4", help="comma-separated w<b>a<b> settings")
    p.add_argument(
        "--first-last",
        default="w8a8",
        help="bits of the first and last layers ('same': like the others)",
    )
    p.add_argument("--skip-ours", action="store_true", help="baselines only")
    p.add_argument("--qat-epochs", type=int, default=None, help="default: the demo's fine-tune")
    p.add_argument("--calib", type=int, default=256, help="calibration images for the PTQ")
    p.add_argument("--budget", default=None, help="archnet latency budget (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    bit_specs = [b.strip() for b in args.bits.split(",") if b.strip()]
    for b in bit_specs:
        parse_bits(b)
    first_last = None if args.first_last == "same" else parse_bits(args.first_last)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    cfg = demo_config(args.fast, TARGET)
    target = load_target(TARGET)
    teacher, train, heldout = load_teacher(args.out, args.fast, args.seed)
    args.shape = (cfg.latency.batch_size or target.batch_size, *train.images.shape[1:])
    console.print(
        f"  {len(train)} unlabeled training images, {len(heldout)} held-out labelled; "
        f"ONNX input {args.shape}"
    )

    rows: list[dict[str, Any]] = []
    protos: dict[str, onnx.ModelProto] = {}

    def add(key: str, method: str, bits: str, proto: onnx.ModelProto, size_bits: int, **extra):
        protos[key] = proto
        rows.append(
            {
                "key": key,
                "method": method,
                "bits": bits,
                "size_kb": size_bits / 8 / 1024,
                **extra,
            }
        )

    add(
        "teacher",
        "FP32 teacher",
        "fp32",
        export_onnx(teacher, args.shape),
        model_size_bits(teacher),
        torch_top1=evaluate(teacher, heldout),
    )

    console.print("[bold]ptq[/] onnxruntime quantize_static (QDQ, per-channel int8, MinMax)")
    t0 = time.perf_counter()
    ptq = ptq_onnxruntime(teacher, train.images[: args.calib], args.shape)
    add(
        "ptq",
        "onnxruntime static PTQ",
        "w8a8",
        ptq,
        onnx_size_bits(ptq),
        seconds=time.perf_counter() - t0,
    )

    fl_text = "" if first_last is None else f", first/last {args.first_last}"
    ft = copy.deepcopy(cfg.finetune)
    if args.qat_epochs is not None:
        ft.epochs = args.qat_epochs
    steps = ft.epochs * -(-len(train) // ft.batch_size)
    for spec in bit_specs:
        t0 = time.perf_counter()
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(f"LSQ QAT {spec} ({ft.epochs} epochs)", total=steps)

            def on_step(loss: float, task=task, bar=bar, spec=spec) -> None:
                bar.update(task, advance=1, description=f"LSQ QAT {spec} KD loss {loss:.4f}")

            student = lsq_qat(
                teacher, train.images, parse_bits(spec), first_last, ft, args.seed, on_step
            )
        torch.save(student, args.out / f"lsq_qat-{spec}.pt")
        add(
            f"lsq-{spec}",
            "LSQ QAT (logit KD)",
            spec + fl_text,
            export_qdq(student, args.shape),
            model_size_bits(student),
            torch_top1=evaluate(student, heldout),
            seconds=time.perf_counter() - t0,
        )

    if args.skip_ours:
        console.print("[bold]ours[/] skipped (--skip-ours)")
    for spec in [] if args.skip_ours else bit_specs:
        console.print(f"[bold]ours[/] archnet convert, bits {spec}{fl_text}")
        t0 = time.perf_counter()
        student, proto, run_dir = run_ours(teacher, train, heldout, spec, args)
        add(
            f"ours-{spec}",
            "archnet (ours)",
            spec + fl_text,
            proto,
            model_size_bits(student),
            torch_top1=evaluate(student, heldout),
            seconds=time.perf_counter() - t0,
            run_dir=str(run_dir),
        )

    console.print("[bold]top-1[/] held-out digits, every model run in onnxruntime")
    for row in rows:
        row["top1"] = onnx_top1(protos[row["key"]], heldout.images, heldout.labels)

    backend = target.latency_backend()
    console.print(
        f"[bold]latency[/] {len(protos)} ONNX models interleaved on {backend} "
        f"({cfg.latency.rounds} rounds, {cfg.latency.repeats} samples each)"
    )
    times = backend.measure_interleaved(
        {key: (proto, args.shape) for key, proto in protos.items()},
        rounds=cfg.latency.rounds,
        warmup=cfg.latency.warmup,
        repeats=cfg.latency.repeats,
    )
    for row in rows:
        row["latency_ms"] = times[row["key"]]

    table = markdown_table(rows)
    title = (
        f"Quantization on the demo teacher (tiny_effnet, digits 32x32): top-1 on "
        f"{len(heldout)} held-out images; latency onnxruntime CPU, {backend.threads} thread, "
        f"batch {args.shape[0]}, one interleaved run"
    )
    (args.out / "quant_table.md").write_text(f"{title}\n\n{table}\n")
    results = {
        "title": title,
        "input_shape": list(args.shape),
        "fast": args.fast,
        "qat_epochs": ft.epochs,
        "first_last": args.first_last,
        "backend": {"name": backend.name, "device": backend.device, "threads": backend.threads},
        "latency": dataclasses.asdict(cfg.latency),
        "skip_ours": args.skip_ours,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    (args.out / "quant_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(title)
    print()
    print(table)
    print()
    print(f"written: {args.out / 'quant_table.md'}, {args.out / 'quant_results.json'}")


if __name__ == "__main__":
    main()
