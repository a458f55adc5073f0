"""Quantization baselines against archnet on the demo teacher: one table, mean ± std over seeds.

Every method runs at every bit setting (default W8A8, W4A4, W2A4; the first and last layers at
``--first-last``): onnxruntime's static post-training quantization, plain LSQ
quantization-aware fine-tuning of the whole teacher (label-free: logit KD only) and archnet's
quantized conversion. The FP32 teacher is trained once (seed 0); what each of the ``--seeds``
seeds varies is the quantized method's randomness: the PTQ's calibration sample, LSQ QAT's and
archnet's training seed. Each row reports, as mean ± std over seeds, top-1 on the evaluation
images (every model's ONNX run in onnxruntime), its drop from the teacher, the onnxruntime
latency and its ratio to the teacher (all models timed in one interleaved run on the cpu-ort
target's backend) and one size measure for every row: the bytes of the ONNX file.

    python bench/bench_quant.py                                # full settings (hours)
    python bench/bench_quant.py --fast --seeds 1               # a smoke run
    python bench/bench_quant.py --methods ptq,lsq --bits w4a4  # a part of the table
    python bench/bench_quant.py --cached-only                  # the table of what is done
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from torch import nn

import archnet
from archnet.config import ConvertConfig
from archnet.demo import demo_config, demo_teacher_cached, teacher_file
from archnet.onnx_utils import export_onnx
from archnet.quant import (
    QUANTIZER_VERSION,
    export_any,
    export_qdq,
    is_quantized,
    onnx_bytes,
    parse_bits,
)
from archnet.quant.baselines import lsq_qat, onnx_top1, ptq_onnxruntime, u8s8_saturates
from archnet.stages import config_changes, first_stage
from archnet.targets import load_target
from archnet.zoo import demo_data

TARGET = "cpu-ort"
# the bar for archnet: at most this many points of top-1 below the FP32 teacher
MAX_DROP = {"w4a4": 1.0, "w2a4": 3.0}
console = Console()


@dataclass
class Bench:
    """What every method reads: the teacher, its data, the settings."""

    teacher: nn.Module
    train: Any  # ImageData: the conversion and the QAT see its images only, never its labels
    test: Any  # labelled ImageData for top-1
    shape: tuple[int, ...]  # the fixed ONNX input shape every model is exported and timed at
    first_last: tuple[int, int] | None
    args: argparse.Namespace


@dataclass
class Run:
    """One method at one bit setting and seed."""

    method: str
    bits: str
    seed: int
    proto: onnx.ModelProto
    seconds: float
    note: str = ""
    top1: float = 0.0
    latency_ms: float = 0.0
    size: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.method}-{self.bits}-s{self.seed}"

    def record(self) -> dict[str, Any]:
        """Everything but the model, for the JSON results."""
        fields = [f.name for f in dataclasses.fields(self) if f.name != "proto"]
        return {"key": self.key, **{name: getattr(self, name) for name in fields}}


# --- the methods ------------------------------------------------------------------------------


def run_ptq(b: Bench, spec: str, seed: int) -> tuple[onnx.ModelProto, str]:
    """onnxruntime static PTQ; the seed draws the calibration sample from the training images."""
    order = torch.randperm(len(b.train), generator=torch.Generator().manual_seed(seed))
    calib = b.train.images[order[: b.args.calib]]
    w, _ = parse_bits(spec)
    proto = ptq_onnxruntime(
        b.teacher, calib, b.shape, bits=parse_bits(spec), first_last=b.first_last
    )
    if not u8s8_saturates():
        return proto, ""
    if w == 8:
        return proto, "weights at 7 bits (reduce_range)"
    return proto, "first/last weights at 7 bits (reduce_range)" if b.first_last else ""


def run_lsq(b: Bench, spec: str, seed: int) -> tuple[onnx.ModelProto, str]:
    cfg = demo_config(b.args.fast, TARGET, bits=spec)
    ft = copy.deepcopy(cfg.finetune)
    if b.args.qat_epochs is not None:
        ft.epochs = b.args.qat_epochs
    steps = ft.epochs * -(-len(b.train) // ft.batch_size)
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"LSQ QAT {spec} seed {seed}", total=steps)

        def on_step(loss: float) -> None:
            bar.update(task, advance=1, description=f"LSQ QAT {spec} seed {seed} KD {loss:.4f}")

        student = lsq_qat(
            b.teacher, b.train.images, parse_bits(spec), b.first_last, ft, seed, on_step
        )
    return export_qdq(student, b.shape), f"{ft.epochs} epochs"


def run_ours(b: Bench, spec: str, seed: int) -> tuple[onnx.ModelProto, str]:
    """archnet's conversion with the demo's quantized settings, through the public API."""
    cfg = demo_config(b.args.fast, TARGET, bits=spec)
    cfg.first_last = b.args.first_last
    cfg.seed = seed
    if b.args.budget is not None:
        cfg.budget = b.args.budget
    result = archnet.convert(
        b.teacher,
        b.train.images,  # unlabeled: the conversion never sees a label
        target=TARGET,
        budget=cfg.budget,
        out=b.args.out / f"ours-{spec}-s{seed}",
        eval_data=b.test,
        resume=True,
        config=cfg,
    )
    student = result.student.eval()
    onnx_file = result.run_dir / "student.onnx"
    proto = onnx.load(str(onnx_file)) if onnx_file.exists() else None
    usable = (
        proto is not None
        and input_shape_of(proto) == b.shape
        and (has_qdq(proto) or not is_quantized(student))
    )
    if not usable:  # e.g. exported at another batch size: export the same student here
        proto = export_any(student, b.shape)
    return proto, f"budget {cfg.budget}"


Runner = Callable[[Bench, str, int], tuple[onnx.ModelProto, str]]
METHODS: dict[str, tuple[str, Runner]] = {
    "ptq": ("onnxruntime static PTQ", run_ptq),
    "lsq": ("LSQ QAT (logit KD)", run_lsq),
    "ours": ("archnet (ours)", run_ours),
}


# --- helpers ----------------------------------------------------------------------------------


def settings_digest(args: argparse.Namespace, spec: str) -> str:
    """A hash of what a method's result at ``spec`` depends on: the bench options that shape
    it and the conversion settings its run reads."""
    apart = ("methods", "method_keys", "seeds", "bits", "bit_specs", "out", "fresh_teacher")
    apart += ("cached_only",)
    settings = {k: v for k, v in vars(args).items() if k not in apart}
    settings["quantizer"] = QUANTIZER_VERSION
    cfg = demo_config(args.fast, TARGET, bits=spec)
    settings["config"] = {
        k: v for k, v in config_changes(ConvertConfig(), cfg).items() if first_stage(k, cfg)
    }
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_run(b: Bench, method: str, spec: str, seed: int, runner: Runner) -> Run | None:
    """Run one method, or reuse its model from an earlier bench in ``--out`` with the same
    settings: a killed bench resumes, and methods can be run apart, then tabled together.
    None when ``--cached-only`` and nothing is cached."""
    run = Run(method, spec, seed, onnx.ModelProto(), 0.0)
    digest = settings_digest(b.args, spec)
    model_file, meta_file = (b.args.out / "models" / f"{run.key}.{ext}" for ext in ("onnx", "json"))
    if model_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("settings") == digest:
            console.print(f"  reusing {model_file}")
            run.proto, run.seconds, run.note = (
                onnx.load(str(model_file)),
                meta["seconds"],
                meta["note"],
            )
            return run
    if b.args.cached_only:
        return None
    t0 = time.perf_counter()
    run.proto, run.note = runner(b, spec, seed)
    run.seconds = time.perf_counter() - t0
    model_file.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(run.proto, str(model_file))
    meta = {"settings": digest, "seconds": run.seconds, "note": run.note}
    meta_file.write_text(json.dumps(meta) + "\n")
    return run


def has_qdq(proto: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in proto.graph.node)


def input_shape_of(proto: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim)


def load_teacher(args: argparse.Namespace) -> tuple[nn.Module, Any, Any]:
    """The demo teacher (seed 0), cached in ``--out`` like the demo's, and its data."""
    epochs = args.teacher_epochs if args.teacher_epochs is not None else (1 if args.fast else None)
    file = teacher_file(args.out, 0, epochs)
    if args.fresh_teacher:
        file.unlink(missing_ok=True)
    teacher = demo_teacher_cached(args.out, 0, epochs)
    train, test = demo_data()
    limit = (
        demo_config(args.fast, TARGET).max_samples if args.train_limit is None else args.train_limit
    )
    if limit:
        train = train.subset(limit)
    if args.eval_limit:
        test = test.subset(args.eval_limit)
    return teacher.eval(), train, test


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(values: list[float], digits: int, suffix: str = "", sign: bool = False) -> str:
    mean, std = mean_std(values)
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + suffix + ("" if std is None else f" ± {std:.{digits}f}{suffix}")


HEADER = [
    "method",
    "bits",
    "seeds",
    "top-1 %",
    "drop (pts)",
    "ORT ms",
    "ms / teacher ms",
    "ONNX file kB",
    "note",
]


def table_rows(teacher: Run, runs: list[Run]) -> list[list[str]]:
    """One row per (method, bits) over its seeds, after the teacher's."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.method, r.bits), []).append(r)
    rows = [
        [
            "FP32 teacher",
            "fp32",
            "-",
            f"{teacher.top1:.2f}",
            "-",
            f"{teacher.latency_ms:.3f}",
            "1.00x",
            f"{teacher.size['file_bytes'] / 1e3:.1f}",
            "trained once, seed 0",
        ]
    ]
    for (method, bits), group in groups.items():
        rows.append(
            [
                METHODS[method][0],
                bits,
                str(len(group)),
                fmt([r.top1 for r in group], 2),
                fmt([teacher.top1 - r.top1 for r in group], 2, sign=True),
                fmt([r.latency_ms for r in group], 3),
                fmt([r.latency_ms / teacher.latency_ms for r in group], 2, "x"),
                fmt([r.size["file_bytes"] / 1e3 for r in group], 1),
                "; ".join(sorted({r.note for r in group if r.note})),
            ]
        )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def check_drops(teacher: Run, runs: list[Run]) -> dict[str, dict[str, Any]]:
    """archnet's mean drop at the settings the issue bounds, against its bound."""
    checks = {}
    for spec, bound in MAX_DROP.items():
        drops = [teacher.top1 - r.top1 for r in runs if r.method == "ours" and r.bits == spec]
        if drops:
            mean = statistics.fmean(drops)
            checks[f"ours-{spec}"] = {"mean_drop": mean, "bound": bound, "met": mean <= bound}
    return checks


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_quant"))
    p.add_argument("--fast", action="store_true", help="the demo's fast settings (a smoke run)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method and bit setting")
    p.add_argument("--bits", default="w8a8,w4a4,w2a4", help="comma-separated w<b>a<b> settings")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: ptq,lsq,ours")
    p.add_argument(
        "--first-last",
        default="w8a8",
        help="bits of the first and last layers ('same': like the rest)",
    )
    p.add_argument("--qat-epochs", type=int, default=None, help="default: the demo's fine-tune")
    p.add_argument("--calib", type=int, default=256, help="calibration images for the PTQ")
    p.add_argument("--budget", default=None, help="archnet latency budget (default: the demo's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: the demo's")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="table only the runs an earlier bench in --out finished; name the others",
    )
    p.add_argument("--fresh-teacher", action="store_true", help="retrain even if one is saved")
    p.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="every method sees only the first N train images (default: the demo's max_samples)",
    )
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N images")
    args = p.parse_args(argv)
    args.bit_specs = [b.strip().lower() for b in args.bits.split(",") if b.strip()]
    for spec in args.bit_specs:
        parse_bits(spec)
    args.method_keys = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.method_keys) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; use {', '.join(METHODS)}")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    first_last = None if args.first_last == "same" else parse_bits(args.first_last)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    cfg = demo_config(args.fast, TARGET)
    target = load_target(TARGET)
    teacher, train, test = load_teacher(args)
    shape = (cfg.latency.batch_size or target.batch_size, *train.images.shape[1:])
    bench = Bench(teacher, train, test, shape, first_last, args)
    console.print(
        f"  {len(train)} unlabeled training images, {len(test)} labelled evaluation images "
        f"({test.source}); ONNX input {shape}; seeds 0..{args.seeds - 1}"
    )

    teacher_run = Run("teacher", "fp32", 0, export_onnx(teacher, shape), 0.0)
    runs: list[Run] = []
    missing: list[str] = []
    for method in args.method_keys:
        label, runner = METHODS[method]
        for spec in args.bit_specs:
            for seed in range(args.seeds):
                console.print(f"[bold]{label}[/] {spec}, first/last {args.first_last}, seed {seed}")
                run = cached_run(bench, method, spec, seed, runner)
                if run is None:
                    missing.append(f"{method}-{spec}-s{seed}")
                else:
                    runs.append(run)

    every = [teacher_run, *runs]
    console.print(f"[bold]top-1[/] {len(test)} evaluation images, every model in onnxruntime")
    for r in every:
        r.top1 = onnx_top1(r.proto, test.images, test.labels)
        r.size = dataclasses.asdict(onnx_bytes(r.proto))

    backend = target.latency_backend()
    console.print(
        f"[bold]latency[/] {len(every)} ONNX models interleaved on {backend} "
        f"({cfg.latency.rounds} rounds, {cfg.latency.repeats} samples each)"
    )
    times = backend.measure_interleaved(
        {r.key: (r.proto, shape) for r in every},
        rounds=cfg.latency.rounds,
        warmup=cfg.latency.warmup,
        repeats=cfg.latency.repeats,
    )
    for r in every:
        r.latency_ms = times[r.key]

    table = markdown_table(table_rows(teacher_run, runs))
    title = (
        f"Quantization of the demo teacher ({type(teacher).__name__}, {test.source}, input "
        f"{tuple(shape[1:])}): mean ± std over {args.seeds} seed(s); top-1 on {len(test)} "
        f"evaluation images in onnxruntime; latency onnxruntime CPU, {backend.threads} thread, "
        f"batch {shape[0]}, one interleaved run; size = bytes of the ONNX file"
    )
    if missing:
        title += f"; not run (--cached-only): {', '.join(missing)}"
    checks = check_drops(teacher_run, runs)
    (args.out / "quant_table.md").write_text(f"{title}\n\n{table}\n")
    results = {
        "title": title,
        "input_shape": list(shape),
        "fast": args.fast,
        "seeds": args.seeds,
        "first_last": args.first_last,
        "backend": {"name": backend.name, "device": backend.device, "threads": backend.threads},
        "latency": dataclasses.asdict(cfg.latency),
        "size_measure": "ONNX file bytes (onnx_bytes(...).file_bytes)",
        "checks": checks,
        "missing": missing,
        "runs": [r.record() for r in every],
        "seconds": time.perf_counter() - started,
    }
    (args.out / "quant_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{title}\n\n{table}\n")
    for name, c in checks.items():
        verdict = "met" if c["met"] else "NOT met"
        print(f"{name}: mean drop {c['mean_drop']:+.2f} pts (bound {c['bound']:.1f}): {verdict}")
    print(f"written: {args.out / 'quant_table.md'}, {args.out / 'quant_results.json'}")


if __name__ == "__main__":
    main()
