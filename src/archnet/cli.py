"""The ``archnet`` command: demo, convert, search, latency, export, check, targets, report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from archnet.errors import ArchnetError
from archnet.report.summary import print_summary

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
    if not dims or min(dims) <= 0:
        raise ArchnetError(
            f"--input-size {text!r} is not a list of positive sizes: C,H,W for images "
            "(3,224,192), any shape for tensor data (1,16000 for audio frames)"
        )
    return dims


# CLI options -> config keys (dotted for nested settings)
_OPTIONS = {
    "task": "task",
    "target": "target",
    "budget": "budget",
    "params_budget": "params_budget",
    "macs_budget": "macs_budget",
    "size_budget": "size_budget",
    "bits": "bits",
    "first_last": "first_last",
    "bit_choices": "bit_choices",
    "blocks": "blocks",
    "candidates": "candidates",
    "eval_data": "eval_data",
    "seed": "seed",
    "max_samples": "max_samples",
    "rerank": "rerank",
    "epochs": "blockwise.epochs",
    "finetune_epochs": "finetune.epochs",
    "workers": "blockwise.workers",
    "plugin": "plugins",
    "executor": "executor",
    "ray_address": "ray_address",
    "gpus_per_job": "gpus_per_job",
    "device": "device",
    "amp": "blockwise.amp",
    "latency_cache": "latency.cache",
}


def _apply_options(cfg, a: argparse.Namespace) -> None:
    """Set every option given on the command line (and only those) on ``cfg``."""
    for option, key in _OPTIONS.items():
        value = getattr(a, option, None)
        if value is None:
            continue
        *path, name = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, name, value)


@command("convert")
def _convert(a: argparse.Namespace) -> int:
    from archnet.api import is_run, start
    from archnet.config import ConvertConfig, merge_settings, read_toml
    from archnet.models import load_model
    from archnet.store import open_store

    if a.task == "translation":
        from archnet.seq2seq.cli import convert

        return convert(a)
    resuming = a.resume and is_run(a.out)
    if not resuming and (not a.model or not a.data):
        raise ArchnetError("convert needs --model and --data (or --resume with an existing --out)")
    if resuming:
        cfg = open_store(a.out).config
        if a.config:  # the file's settings replace the stored ones; the run redoes what they touch
            merged = merge_settings(cfg.to_dict(), read_toml(a.config))
            cfg = ConvertConfig.from_dict(merged, a.config)
    else:
        cfg = ConvertConfig.load(a.config) if a.config else ConvertConfig()
    if a.model:
        cfg.model, cfg.checkpoint = a.model, a.checkpoint
    if a.data:
        cfg.data = a.data
    if a.input_size:
        cfg.input_size = _input_size(a.input_size)
    elif not resuming:
        cfg.input_size = None  # the model's own, else the data set's
    _apply_options(cfg, a)
    model = load_model(a.model, a.checkpoint) if a.model else None
    result = start(model, a.data, cfg, a.out, eval_data=cfg.eval_data, resume=a.resume)
    print_summary(result.report, result.run_dir, out)
    return 0


@command("search")
def _search(a: argparse.Namespace) -> int:
    from archnet.config import ConvertConfig
    from archnet.stages import reconcile, run_stages
    from archnet.stages.latency import check_budgets
    from archnet.store import RunStore, open_store

    store = open_store(a.run)
    with store.locked():
        if "score" not in store.done():
            raise ArchnetError(
                f"{a.run} has no scored candidates yet; finish it with "
                f"`archnet convert --resume --out {a.run}`"
            )
        new = ConvertConfig.from_dict(store.config.to_dict())
        _apply_options(new, a)
        check_budgets(RunStore(store.root, new))  # an infeasible budget changes nothing
        reconcile(store, new)
        run_stages(store, until="search")
    out.print(
        f"re-solved {a.run}; run `archnet export --run {a.run}` to assemble, fine-tune "
        "and export the new student"
    )
    return 0


@command("export")
def _export(a: argparse.Namespace) -> int:
    from archnet.api import finish
    from archnet.store import open_store

    store = open_store(a.run)
    if a.format in ("qdq", "qonnx") and not store.config.bits:
        raise ArchnetError(
            f"{a.run} holds a float student; {a.format.upper()} export needs a quantized one: "
            "convert with --bits (e.g. --bits w8a8)"
        )
    result = finish(store)
    print_summary(result.report, result.run_dir, out)
    kind = "QDQ ONNX" if store.config.bits else "ONNX"
    out.print(f"{kind} student: {result.run_dir / 'student.onnx'}")
    if a.format == "qonnx":
        from archnet.quant.qonnx import write_qonnx
        from archnet.stages import common
        from archnet.stages.assemble import load_student

        path = result.run_dir / "student.qonnx.onnx"
        x = common.task(store).inputs(store, "eval")[:8]
        found = write_qonnx(load_student(store), common.input_shape(store), path, x)
        out.print(
            f"QONNX student: {path} ({found['quant_nodes']} Quant nodes; qonnx's executor "
            f"agrees with PyTorch within {found['max_abs_diff']:.2g}; estimated "
            f"{found['bops'] / 1e6:.2f} M bit operations)"
        )
    return 0


@command("report")
def _report(a: argparse.Namespace) -> int:
    from archnet.store import CorruptResult, open_store, read_json

    store = open_store(a.run)
    if "report" not in store.done():  # absent, or stale after `archnet search`
        raise ArchnetError(
            f"{a.run} has no report yet; finish it with `archnet export --run {a.run}`"
        )
    try:
        print_summary(read_json(store.path("report.json")), store.root, out)
    except (CorruptResult, KeyError, TypeError):
        raise ArchnetError(
            f"{store.path('report.json')} is unreadable; run `archnet export --run {a.run}` "
            "to write it again"
        ) from None
    return 0


@command("latency")
def _latency(a: argparse.Namespace) -> int:
    """Per-block latency table of a model on a target (no training)."""
    from archnet.blocks import find_blocks
    from archnet.config import ConvertConfig
    from archnet.costs import outside_network
    from archnet.models import load_model
    from archnet.stages.prepare import resolve_input_size
    from archnet.targets import load_target

    model = load_model(a.model, a.checkpoint)
    cfg = ConvertConfig(input_size=_input_size(a.input_size))
    resolve_input_size(cfg, model, "")
    size = cfg.input_size
    target = load_target(a.target)
    backend = target.latency_backend()
    batch = a.batch_size or target.batch_size
    specs = find_blocks(model, size, a.blocks)
    kw = {"warmup": a.warmup, "repeats": a.repeats}
    table = Table(
        title=f"{a.model} {'x'.join(map(str, (batch, *size)))} on {target.name} "
        f"({backend.name}, {backend.device}, {backend.threads} thread(s))"
    )
    unit = "estimated ms" if backend.estimated else "ms"
    for col in ("block", "input", "output", unit):
        table.add_column(col, justify="right" if col == unit else "left")
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
    how = "estimated" if backend.estimated else "measured"
    table.add_row(f"{how} network", "", "", f"{whole:.4f}")
    out.print(table)
    return 0


@command("plan")
def _plan(a: argparse.Namespace) -> int:
    """What a conversion will do, in seconds, before any training (exit 1: it would refuse)."""
    from archnet.blocks import find_blocks
    from archnet.config import ConvertConfig
    from archnet.models import load_model
    from archnet.plan import plan_conversion
    from archnet.plugins import load_plugins
    from archnet.stages.common import resolve_mode
    from archnet.stages.prepare import resolve_input_size
    from archnet.targets import load_target

    load_plugins(a.plugin)
    model = load_model(a.model, a.checkpoint)
    cfg = ConvertConfig(input_size=_input_size(a.input_size), target=a.target, mode=a.mode)
    resolve_input_size(cfg, model, "")
    target = load_target(a.target)
    specs = find_blocks(model, cfg.input_size, a.blocks)
    patterns = [p.strip() for p in a.candidates.split(",")] if a.candidates else None
    mode = resolve_mode(cfg)
    plan = plan_conversion(model, specs, target, mode, (1, *cfg.input_size), patterns)
    blocks = Table(title=f"{a.model}: {len(specs)} blocks, {mode} mode on {target.name}")
    for col in ("block", "input", "output", "candidates the target runs"):
        blocks.add_column(col)
    for spec in specs:
        shapes = ("x".join(map(str, s)) for s in (spec.in_shape, spec.out_shape))
        blocks.add_row(spec.name, *shapes, str(plan.candidates[spec.name]))
    out.print(blocks)
    if plan.rewrites:
        rewrites = Table(title="shell rewrites (compared with the teacher's layer on its input)")
        for col in ("module", "was", "now", "how close"):
            rewrites.add_column(col)
        for r in plan.rewrites:
            how = "in place" if r.exact is None else "exact" if r.exact else "approximate"
            error = "" if r.error is None else f" ({r.error:.1e})"
            rewrites.add_row(r.module, r.was, r.now, how + error)
        out.print(rewrites)
    for line in plan.left:
        print(f"left: {line}")
    print(
        f"plan: {len(specs)} blocks, {len(plan.rewrites)} shell rewrites, "
        + ("nothing left outside the blocks" if plan.ok else f"{len(plan.left)} node(s) left")
    )
    return 0 if plan.ok else 1


@command("check")
def _check(a: argparse.Namespace) -> int:
    """One line per broken rule and per node the checker could not verify; exit 1 on any
    violation, and on anything unverified unless --allow-unverified (for CI).

    A quantized (QDQ) model also gets a table of its quantized tensors: the width each
    declares beside the width the graph proves, because an integer chip runs the graph, not
    the declaration.
    """
    from collections import Counter

    import onnx
    from rich.markup import escape

    from archnet.targets import load_target
    from archnet.targets.check import check_report, format_unverified, format_violation
    from archnet.targets.qdq import MISMATCH, UNVERIFIED, VERIFIED, float_compute_nodes

    path = Path(a.model)
    if not path.is_file():
        raise ArchnetError(f"{path} does not exist; pass the path of an .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception:
        raise ArchnetError(f"{path} is not a readable ONNX model") from None
    target = load_target(a.target)
    report = check_report(model, target)
    # plain print: rich would read "[from module]" as markup and wrap long lines
    for v in report.violations:
        print(format_violation(v))
    for u in report.unverified:
        print(format_unverified(u))
    allowed = " (unverified allowed)" if a.allow_unverified and report.unverified else ""
    print(
        f"{len(report.violations)} violation(s), {len(report.unverified)} unverified{allowed} "
        f"of {target.name} in {report.nodes} nodes"
    )
    tensors = report.tensors
    if tensors:
        verdicts = {VERIFIED: "yes", MISMATCH: "NO", UNVERIFIED: "unverified", None: "-"}
        table = Table(title=f"quantized tensors of {escape(path.name)}")
        columns = ("name", "kind", "declared", "graph bits", "storage", "signed", "per-channel")
        for col in (*columns, "consumer", "verified"):
            table.add_column(col, justify="right" if col in ("declared", "graph bits") else "left")
        for t in tensors:
            table.add_row(
                escape(t.name),
                t.kind,
                "-" if t.declared_bits is None else str(t.declared_bits),
                str(t.bits),
                t.storage,
                "yes" if t.signed else "no",
                "yes" if t.per_channel else "no",
                escape(t.consumer) or "-",
                verdicts[t.declaration],
            )
        out.print(table)
        widths = sorted(Counter(t.bits for t in tensors).items(), reverse=True)
        counts = ", ".join(f"{n} at {bits} bits" for bits, n in widths)
        states = Counter(t.declaration for t in tensors if t.declaration is not None)
        declared = ", ".join(
            f"{states[s]} {s}" for s in (VERIFIED, MISMATCH, UNVERIFIED) if s in states
        )
        noun = "tensor" if len(tensors) == 1 else "tensors"
        print(
            f"{len(tensors)} quantized {noun}: {counts} by the graph; "
            f"declared: {declared or 'none'}; "
            f"float compute nodes: {len(float_compute_nodes(model))}"
        )
    return 0 if report.passed(allow_unverified=a.allow_unverified) else 1


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
    print_summary(rep, run_dir, out)
    return 0


@command("demo-vit")
def _demo_vit(a: argparse.Namespace) -> int:
    from archnet.demo_vit import CONVERSIONS, run_demo_vit, vit_table

    only = [c.strip() for c in a.only.split(",")] if a.only else None
    unknown = [c for c in only or [] if c not in CONVERSIONS]
    if unknown:
        raise ArchnetError(
            f"--only: unknown conversion(s) {', '.join(unknown)}; choose from {', '.join(CONVERSIONS)}"
        )
    rows = run_demo_vit(Path(a.out), fast=a.fast, only=only)
    for _, rep, run_dir in rows:
        print_summary(rep, run_dir, out)
    out.print(vit_table(rows))
    return 0


@command("status")
def _status(a: argparse.Namespace) -> int:
    """Stages done and jobs done / running / failed / left, with an ETA."""
    from archnet.status import run_status

    print(run_status(a.run))
    return 0


@command("translate")
def _translate(a: argparse.Namespace) -> int:
    from archnet.seq2seq.cli import translate

    return translate(a)


@command("demo-mt")
def _demo_mt(a: argparse.Namespace) -> int:
    from archnet.seq2seq.cli import demo_mt

    return demo_mt(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archnet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="train a small teacher on Fashion-MNIST, convert it, print the table"
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--fast", action="store_true", help="fewer epochs (for smoke tests)")
    d.add_argument(
        "--target",
        default="cpu-ort",
        help="cpu-ort (HANT search, the default) or archnet-5op (Arch-Net mode)",
    )
    d.add_argument("--bits", help="also quantize the student, e.g. w4a4 or w2a4")

    v = sub.add_parser(
        "demo-vit",
        help="train a small timm ViT on Fashion-MNIST, convert it with HANT and with Arch-Net "
        "(float and W4A4), print one table",
    )
    v.add_argument("--out", default="runs/demo")
    v.add_argument("--fast", action="store_true", help="fewer epochs (for smoke tests)")
    v.add_argument("--only", help="comma-separated conversions: HANT, Arch-Net, Arch-Net W4A4")

    c = sub.add_parser("convert", help="convert a teacher into a student for a target")
    c.add_argument(
        "--model", help="timm:NAME, zoo:NAME, package.module:factory, or hf:DIR (translation)"
    )
    c.add_argument("--checkpoint", help="state dict (.pth) for the model")
    c.add_argument(
        "--data",
        help="unlabeled images: 'fashion-mnist' (or fashion-mnist:DIR), 'digits', an image "
        "folder or a .pt/.npy tensor",
    )
    c.add_argument(
        "--eval-data",
        help="images to evaluate on, never used for a choice (default: the data set's test "
        "split, else a part carved out of --data)",
    )
    c.add_argument(
        "--input-size",
        help="C,H,W, or any shape for tensor data (default: the model's, e.g. timm's pretrained cfg)",
    )
    c.add_argument("--target", help="built-in target name or a .toml file (default cpu-ort)")
    c.add_argument(
        "--task",
        help="what the outputs are: 'classification' (one softmax), 'multilabel' (independent "
        "sigmoids), 'regression' (real values) or 'translation' (an encoder-decoder, "
        "--model hf:DIR): sets the distillation loss and the figures; default 'auto' reads "
        "it from the teacher's outputs (logits read as classes)",
    )
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
    c.add_argument(
        "--plugin",
        help="modules to import first (comma-separated): converters or candidates they "
        "register are used like the built-in ones",
    )
    c.add_argument("--workers", type=int, help="processes for candidate training and scoring")
    c.add_argument(
        "--executor",
        help="where candidate and scoring jobs run: inprocess, process (--workers N), ray "
        "(default: process when --workers > 1, else inprocess)",
    )
    c.add_argument("--ray-address", help="a Ray cluster ('auto': the one `ray start` began)")
    c.add_argument("--gpus-per-job", type=float, help="GPUs each Ray job asks for (0.25 shares)")
    c.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    c.add_argument(
        "--amp",
        action="store_const",
        const=True,
        help="mixed precision (bfloat16) in blockwise training",
    )
    c.add_argument("--max-samples", type=int, help="cap on unlabeled training images")
    c.add_argument(
        "--rerank",
        type=int,
        help="try the K best students of the ILP with a short end-to-end fine-tune each and "
        "keep the one closest to the teacher on the selection split (default 0: the ILP's best)",
    )
    c.add_argument("--seed", type=int, help="fixes the splits, initialisations and batch order")
    c.add_argument(
        "--latency-cache",
        help="a latency cache (SQLite) shared with other runs: each module is timed once and "
        "runs with the same seed, data and cache choose the same student",
    )
    c.add_argument("--config", help="a TOML config (as written to a run's config.toml)")
    c.add_argument("--out", required=True, help="run directory")
    c.add_argument("--resume", action="store_true", help="continue the run in --out")

    st = sub.add_parser("status", help="where a run stands: stages done, jobs left, ETA")
    st.add_argument("--run", required=True)

    s = sub.add_parser("search", help="re-solve the ILP of a run from its cached tables")
    s.add_argument("--run", required=True)
    s.add_argument("--budget")
    s.add_argument("--params-budget")
    s.add_argument("--macs-budget")
    s.add_argument("--size-budget")
    s.add_argument("--rerank", type=int)

    e = sub.add_parser("export", help="finish a run: assemble, fine-tune, export ONNX, report")
    e.add_argument("--run", required=True)
    e.add_argument(
        "--format",
        choices=("onnx", "qdq", "qonnx"),
        default="onnx",
        help="qdq: require the quantized student's QuantizeLinear/DequantizeLinear ONNX; "
        "qonnx: also write student.qonnx.onnx (Quant nodes with bit widths, FINN-style)",
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

    pl = sub.add_parser(
        "plan",
        help="what a conversion will do, before any training: blocks, candidates, shell "
        "rewrites (exact or approximate), what the target cannot run (exit 1 if anything)",
    )
    pl.add_argument("--model", required=True)
    pl.add_argument("--checkpoint")
    pl.add_argument("--input-size")
    pl.add_argument("--target", default="archnet-5op")
    pl.add_argument("--blocks")
    pl.add_argument("--candidates", help="candidate patterns (default '*')")
    pl.add_argument("--mode", default="auto", choices=("auto", "hant", "archnet"))
    pl.add_argument("--plugin", help="modules to import first (their converters count)")

    k = sub.add_parser(
        "check",
        help="check an ONNX model against a target's operators and attribute rules, and every "
        "bit width it declares against its graph; a quantized (QDQ) model also gets a table "
        "of its quantized tensors (exit 1 on any violation or unverified node)",
    )
    k.add_argument("model", help="an .onnx file")
    k.add_argument("--target", required=True, help="built-in target name or a .toml file")
    k.add_argument(
        "--allow-unverified",
        action="store_true",
        help="exit 0 when the only findings are nodes whose values the graph does not show",
    )

    sub.add_parser("targets", help="list built-in targets")
    from archnet.seq2seq.cli import add_parsers

    add_parsers(sub)
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
