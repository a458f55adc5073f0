"""The ``archnet`` command: demo, convert, search, latency, export, check, targets, report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from archnet.errors import ArchnetError
from archnet.report import faster

out = Console()
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return deco


def _input_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise ArchnetError(f"--input-size {text!r} is not C,H,W (e.g. 3,224,224)")
    return dims


def _default_input_size(model, data: str) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    if data == "digits":
        return (3, 32, 32)
    raise ArchnetError("cannot tell the model's input size; pass --input-size C,H,W")


def print_summary(rep: dict, run_dir: Path) -> None:
    """The teacher-vs-student table every conversion ends with."""
    t, s = rep["teacher"], rep["student"]
    lat = rep["latency"]
    table = Table(
        title=f"archnet: {rep['model']} on {rep['target']['name']} "
        f"({lat['backend']}, {lat['threads']} thread(s), batch {lat['input_shape'][0]})"
    )
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    table.add_column("student / teacher", justify="right")
    table.add_row(
        "latency, measured (ms)",
        f"{t['latency_ms']:.3f}",
        f"{s['latency_ms']:.3f}",
        f"{1 / rep['speedup']:.2f} ({faster(rep['speedup'])})",
    )
    table.add_row(
        "latency, sum of parts (ms)",
        f"{t['sum_of_parts_ms']:.3f}",
        f"{s['sum_of_parts_ms']:.3f}",
        f"prediction error {100 * rep['prediction_error']:.1f}%",
    )
    table.add_row(
        "latency, search table (ms)",
        f"{t['predicted_latency_ms']:.3f}",
        f"{s['predicted_latency_ms']:.3f}",
        f"error {100 * rep['table_prediction_error']:.1f}% (incl. drift)",
    )
    if "top1" in s:
        table.add_row(
            "top-1 held-out (%)",
            f"{t['top1']:.2f}",
            f"{s['top1']:.2f}",
            f"{s['top1'] - t['top1']:+.2f} points",
        )
    table.add_row(
        "parameters", f"{t['params']:,}", f"{s['params']:,}", f"{s['params'] / t['params']:.2f}"
    )
    table.add_row("MACs", f"{t['macs']:,}", f"{s['macs']:,}", f"{s['macs'] / t['macs']:.2f}")
    table.add_row(
        "size (kB)",
        f"{t['size_bits'] / 8e3:,.1f}",
        f"{s['size_bits'] / 8e3:,.1f}",
        f"{s['size_bits'] / t['size_bits']:.3f}",
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
            else f"same class as PyTorch on {100 * q['runtime_argmax_agreement']:.1f}%"
        )
        out.print(
            f"quantized {bits}, first/last {q['first_last']}: {storage}; QDQ graph within "
            f"{q['max_abs_diff']:.2e} of PyTorch (one output step {q['output_step']:.2e}); "
            f"as onnxruntime runs it: {deployed}"
        )
    if rep.get("ablation"):
        abl = Table(title="Arch-Distillation ablation (same student, same data)")
        for col in ("variant", "top-1 (%)", "KL from teacher"):
            abl.add_column(col, justify="left" if col == "variant" else "right")
        for label, row in rep["ablation"].items():
            top = row.get("top1")
            abl.add_row(label, "n/a" if top is None else f"{top:.2f}", f"{row['kl']:.4f}")
        out.print(abl)
    out.print(
        f"budget {rep['budget_spec']} -> {rep['budgets']['latency_ms']:.3f} ms; "
        f"{rep['search']['pool_size']} candidates, search space 10^"
        f"{rep['search']['space_log10']:.1f}; report: {run_dir / 'report.md'}"
    )


@command("convert")
def _convert(a: argparse.Namespace) -> int:
    from archnet.config import ConvertConfig
    from archnet.models import load_model
    from archnet.pipeline import create_run, finish, open_run

    if a.resume and Path(a.out, "state.json").exists():
        result = finish(open_run(a.out))
        print_summary(result.report, result.run_dir)
        return 0
    if not a.model or not a.data:
        raise ArchnetError("convert needs --model and --data (or --resume with an existing --out)")
    cfg = ConvertConfig.load(a.config) if a.config else ConvertConfig()
    model = load_model(a.model, a.checkpoint)
    cfg.model, cfg.checkpoint, cfg.data = a.model, a.checkpoint, a.data
    cfg.input_size = _input_size(a.input_size) or _default_input_size(model, a.data)
    for key in (
        "target",
        "budget",
        "params_budget",
        "macs_budget",
        "size_budget",
        "bits",
        "first_last",
        "bit_choices",
        "blocks",
        "candidates",
        "eval_data",
        "seed",
        "max_samples",
    ):
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    if a.epochs is not None:
        cfg.blockwise.epochs = a.epochs
    if a.finetune_epochs is not None:
        cfg.finetune.epochs = a.finetune_epochs
    if a.workers is not None:
        cfg.blockwise.workers = a.workers
    result = finish(create_run(model, a.data, cfg, a.out, eval_data=cfg.eval_data, resume=a.resume))
    print_summary(result.report, result.run_dir)
    return 0


@command("search")
def _search(a: argparse.Namespace) -> int:
    from archnet.pipeline import STAGES, open_run

    run = open_run(a.run)
    if "score" not in run.state["done"]:
        raise ArchnetError(
            f"{a.run} has no scored candidates yet; finish it with "
            f"`archnet convert --resume --out {a.run}`"
        )
    if a.budget is not None:
        run.config.budget = a.budget
    for key in ("params_budget", "macs_budget", "size_budget"):
        if getattr(a, key) is not None:
            setattr(run.config, key, getattr(a, key))
    run.invalidate("search")
    run.config.save(run.path("config.toml"))
    # solve once quietly first: an infeasible budget then ends in one error line, before
    # run_stages prints its stage header (the re-solve below takes well under a second)
    STAGES["search"](run)
    from archnet.pipeline import run_stages

    run_stages(run, until="search")
    out.print(
        f"re-solved {a.run}; run `archnet export --run {a.run}` to assemble, fine-tune "
        "and export the new student"
    )
    return 0


@command("export")
def _export(a: argparse.Namespace) -> int:
    from archnet.pipeline import finish, open_run

    run = open_run(a.run)
    if a.format == "qdq" and not run.config.bits:
        raise ArchnetError(
            f"{a.run} holds a float student; QDQ export needs a quantized one: convert with "
            "--bits (e.g. --bits w8a8)"
        )
    result = finish(run)
    print_summary(result.report, result.run_dir)
    kind = "QDQ ONNX" if run.config.bits else "ONNX"
    out.print(f"{kind} student: {result.run_dir / 'student.onnx'}")
    return 0


@command("report")
def _report(a: argparse.Namespace) -> int:
    from archnet.pipeline import open_run

    run = open_run(a.run)
    path = run.path("report.json")
    if "report" not in run.state["done"]:  # absent, or stale after `archnet search`
        raise ArchnetError(
            f"{a.run} has no report yet; finish it with `archnet export --run {a.run}`"
        )
    print_summary(json.loads(path.read_text()), run.root)
    return 0


@command("latency")
def _latency(a: argparse.Namespace) -> int:
    """Per-block latency table of a model on a target (no training)."""
    from archnet.blocks import find_blocks
    from archnet.costs import outside_network
    from archnet.models import load_model
    from archnet.targets import load_target

    model = load_model(a.model, a.checkpoint)
    size = _input_size(a.input_size) or _default_input_size(model, "")
    target = load_target(a.target)
    backend = target.latency_backend()
    batch = a.batch_size or target.batch_size
    specs = find_blocks(model, size, a.blocks)
    kw = {"warmup": a.warmup, "repeats": a.repeats}
    table = Table(
        title=f"{a.model} {'x'.join(map(str, (batch, *size)))} on {target.name} "
        f"({backend.name}, {backend.device}, {backend.threads} thread(s))"
    )
    for col in ("block", "input", "output", "ms"):
        table.add_column(col, justify="right" if col == "ms" else "left")
    total = 0.0
    for s in specs:
        shape = (batch, *s.in_shape)
        ms = max(
            backend.measure(model.get_submodule(s.name), shape, **kw) - backend.overhead_ms(shape),
            0.0,
        )
        total += ms
        table.add_row(
            s.name, "x".join(map(str, s.in_shape)), "x".join(map(str, s.out_shape)), f"{ms:.4f}"
        )
    outside = backend.measure(outside_network(model, specs), (batch, *size), **kw)
    whole = backend.measure(model, (batch, *size), **kw)
    table.add_row("(outside blocks)", "", "", f"{outside:.4f}")
    table.add_row("predicted sum", "", "", f"{outside + total:.4f}")
    table.add_row("measured network", "", "", f"{whole:.4f}")
    out.print(table)
    return 0


@command("check")
def _check(a: argparse.Namespace) -> int:
    """One line per broken operator or attribute rule; exit 1 if there is any (for CI).

    A quantized (QDQ) model also gets a table of its quantized tensors, because the bit widths
    an integer chip will see are read from the graph, not from how the model was trained.
    """
    from collections import Counter

    import onnx
    from rich.markup import escape

    from archnet.targets import load_target
    from archnet.targets.opset import (
        check_model,
        float_compute_nodes,
        format_violation,
        quantized_tensors,
    )

    path = Path(a.model)
    if not path.is_file():
        raise ArchnetError(f"{path} does not exist; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception:
        raise ArchnetError(f"{path} is not a readable ONNX model") from None
    target = load_target(a.target)
    violations = check_model(model, target)
    # plain print: rich would read "[from module]" as markup and wrap long lines
    for v in violations:
        print(format_violation(v))
    print(f"{len(violations)} violation(s) of {target.name} in {len(model.graph.node)} nodes")
    tensors = quantized_tensors(model)
    if tensors:
        table = Table(title=f"quantized tensors of {escape(path.name)}")
        for col in ("name", "kind", "bits", "storage", "signed", "per-channel", "consumer"):
            table.add_column(col, justify="right" if col == "bits" else "left")
        for t in tensors:
            table.add_row(
                escape(t.name),
                t.kind,
                str(t.bits),
                t.storage,
                "yes" if t.signed else "no",
                "yes" if t.per_channel else "no",
                escape(t.consumer) or "-",
            )
        out.print(table)
        widths = sorted(Counter(t.bits for t in tensors).items(), reverse=True)
        counts = ", ".join(f"{n} at {bits} bits" for bits, n in widths)
        noun = "tensor" if len(tensors) == 1 else "tensors"
        print(
            f"{len(tensors)} quantized {noun}: {counts}; "
            f"float compute nodes: {len(float_compute_nodes(model))}"
        )
    return 1 if violations else 0


@command("targets")
def _targets(a: argparse.Namespace) -> int:
    from archnet.targets import list_targets

    table = Table(title="built-in targets")
    for col in ("name", "backend", "device", "threads", "batch", "operators", "description"):
        table.add_column(col, no_wrap=col == "name")
    for t in list_targets():
        ops = "all" if t.allowed_ops is None else ", ".join(sorted(t.allowed_ops))
        table.add_row(
            t.name, t.backend, t.device, str(t.threads), str(t.batch_size), ops, t.description
        )
    out.print(table)
    return 0


@command("demo")
def _demo(a: argparse.Namespace) -> int:
    from archnet.demo import run_demo

    rep, run_dir = run_demo(Path(a.out), fast=a.fast, target=a.target, bits=a.bits)
    print_summary(rep, run_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archnet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a small teacher on digits, convert it, print the table")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--fast", action="store_true", help="fewer epochs (for smoke tests)")
    d.add_argument(
        "--target",
        default="cpu-ort",
        help="cpu-ort (HANT search, the default) or archnet-5op (Arch-Net mode)",
    )
    d.add_argument("--bits", help="also quantize the student, e.g. w4a4 or w2a4")

    c = sub.add_parser("convert", help="convert a teacher into a student for a target")
    c.add_argument("--model", help="timm:NAME, zoo:NAME or package.module:factory")
    c.add_argument("--checkpoint", help="state dict (.pth) for the model")
    c.add_argument("--data", help="unlabeled images: a folder, a .pt/.npy tensor, or 'digits'")
    c.add_argument("--eval-data", help="labelled images for top-1 (default: held-out split)")
    c.add_argument("--input-size", help="C,H,W (default: the model's, e.g. timm's pretrained cfg)")
    c.add_argument("--target", help="built-in target name or a .toml file (default cpu-ort)")
    c.add_argument("--budget", help="latency budget: fraction of the teacher ('0.5') or '2.5ms'")
    c.add_argument(
        "--params-budget", help="fraction of the teacher's parameters or a count ('1.5M')"
    )
    c.add_argument("--macs-budget", help="fraction of the teacher's MACs or a count ('300M')")
    c.add_argument(
        "--bits",
        help="quantize the student: 'w4a4' (weights/activations), or 'auto' for mixed "
        "precision chosen by the search (with --size-budget)",
    )
    c.add_argument(
        "--first-last",
        help="bits of the first and last layer (default w8a8; 'same' quantizes them like the rest)",
    )
    c.add_argument("--bit-choices", help="widths 'auto' chooses among (default w8a8,w4a4,w2a4)")
    c.add_argument(
        "--size-budget",
        help="model size: fraction of the teacher's FP32 size ('0.15') or bytes ('1.5MB')",
    )
    c.add_argument("--blocks", help="comma-separated block patterns, e.g. 'layer*.*'")
    c.add_argument("--candidates", help="comma-separated candidate patterns (default '*')")
    c.add_argument("--epochs", type=int, help="blockwise distillation epochs per candidate")
    c.add_argument("--finetune-epochs", type=int, help="end-to-end distillation epochs")
    c.add_argument("--workers", type=int, help="processes for candidate training")
    c.add_argument("--max-samples", type=int, help="cap on unlabeled training images")
    c.add_argument("--seed", type=int)
    c.add_argument("--config", help="a TOML config (as written to a run's config.toml)")
    c.add_argument("--out", required=True, help="run directory")
    c.add_argument("--resume", action="store_true", help="continue the run in --out")

    s = sub.add_parser("search", help="re-solve the ILP of a run from its cached tables")
    s.add_argument("--run", required=True)
    s.add_argument("--budget")
    s.add_argument("--params-budget")
    s.add_argument("--macs-budget")
    s.add_argument("--size-budget")

    e = sub.add_parser("export", help="finish a run: assemble, fine-tune, export ONNX, report")
    e.add_argument("--run", required=True)
    e.add_argument(
        "--format",
        choices=("onnx", "qdq"),
        default="onnx",
        help="qdq: require the quantized student's QuantizeLinear/DequantizeLinear ONNX",
    )

    r = sub.add_parser("report", help="print a finished run's summary table")
    r.add_argument("--run", required=True)

    lt = sub.add_parser("latency", help="per-block latency table of a model on a target")
    lt.add_argument("--model", required=True)
    lt.add_argument("--checkpoint")
    lt.add_argument("--input-size")
    lt.add_argument("--target", default="cpu-ort")
    lt.add_argument("--batch-size", type=int)
    lt.add_argument("--blocks")
    lt.add_argument("--warmup", type=int, default=10)
    lt.add_argument("--repeats", type=int, default=50)

    k = sub.add_parser(
        "check",
        help="check an ONNX model against a target's operators and attribute rules; "
        "a quantized (QDQ) model also gets a table of its quantized tensors and bit widths",
    )
    k.add_argument("model", help="an .onnx file")
    k.add_argument("--target", required=True, help="built-in target name or a .toml file")

    sub.add_parser("targets", help="list built-in targets")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ArchnetError as e:
        print(f"archnet: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "archnet: interrupted; finished work is kept, continue with --resume", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
