"""The conversion as stages over a run directory: each reads earlier files and writes its own.

A stage is skipped when ``state.json`` marks it done, so a killed run resumes where it stopped
(and the candidate jobs inside ``distill`` resume one by one). ``archnet search`` re-solves the
ILP from the cached tables and marks only the later stages stale.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from archnet.blocks import BlockSpec, FeatureCache, find_blocks
from archnet.candidates import build_pool
from archnet.choices import Bits, choice_name, parse_choice, quantize_from
from archnet.config import ConvertConfig, parse_budget
from archnet.costs import block_latency_table
from archnet.data import ImageData
from archnet.distill.blockwise import CandidateJob, load_candidate, run_jobs, steps_per_job
from archnet.distill.finetune import assemble, finetune
from archnet.errors import ArchnetError
from archnet.flops import count_macs, count_params
from archnet.opconvert import split_wide_layers
from archnet.quant import (
    QuantConfig,
    QuantModule,
    is_quantized,
    model_size_bits,
    parse_bits,
    prepare_qat,
)
from archnet.score import logits_of, replace_one_block, top1
from archnet.search import SearchResult, SearchTable, pareto_sweep, plot_pareto, solve
from archnet.targets import LatencyCache, Target, load_target

console = Console(stderr=True)

STAGES: dict[str, Callable[[Run], dict[str, Any]]] = {}


def stage(name: str):
    """Register a pipeline stage; registration order is execution order."""

    def deco(fn: Callable[[Run], dict[str, Any]]):
        STAGES[name] = fn
        return fn

    return deco


@contextmanager
def progress_bar():
    bar = Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with bar:
        yield bar


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass
class Run:
    """A run directory and what the stages share (loaded lazily from its files)."""

    root: Path
    config: ConvertConfig

    # --- files -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def state(self) -> dict[str, Any]:
        p = self.path("state.json")
        return _read_json(p) if p.exists() else {"done": {}}

    def mark_done(self, name: str, info: dict[str, Any]) -> None:
        state = self.state
        state["done"][name] = info
        _write_json(self.path("state.json"), state)

    def invalidate(self, first: str) -> None:
        """Mark ``first`` and every later stage as not done."""
        names = list(STAGES)
        stale = set(names[names.index(first) :])
        state = self.state
        state["done"] = {k: v for k, v in state["done"].items() if k not in stale}
        _write_json(self.path("state.json"), state)

    # --- shared objects ----------------------------------------------------------------------
    @cached_property
    def teacher(self) -> nn.Module:
        return torch.load(self.path("teacher.pt"), map_location="cpu", weights_only=False).eval()

    @cached_property
    def data(self) -> dict[str, torch.Tensor | None]:
        return torch.load(self.path("data.pt"), map_location="cpu", weights_only=True)

    @cached_property
    def specs(self) -> list[BlockSpec]:
        return [
            BlockSpec(d["name"], tuple(d["in_shape"]), tuple(d["out_shape"]))
            for d in _read_json(self.path("blocks.json"))
        ]

    @cached_property
    def target(self) -> Target:
        return load_target(self.config.target)

    @property
    def features(self) -> FeatureCache:
        return FeatureCache(self.path("features"))

    @property
    def batch_size(self) -> int:
        return self.config.latency.batch_size or self.target.batch_size

    def images(self, split: str) -> torch.Tensor:
        return self.data[f"{split}_images"].float()

    def jobs(self, choices_only: bool = False) -> list[CandidateJob]:
        """Training jobs: every float candidate (quantized choices start from them) and every
        choice of the search; ``choices_only`` keeps just the choices."""
        pools = _read_json(self.path("pool.json"))
        jobs = []
        for i, spec in enumerate(self.specs):
            pool = pools[spec.name]
            names = (
                pool["choices"]
                if choices_only
                else dict.fromkeys(pool["candidates"] + pool["choices"])
            )
            jobs += [
                CandidateJob(i, spec, name, self.path(f"candidates/{i:03d}_{spec.name}/{name}.pt"))
                for name in names
            ]
        return jobs

    @property
    def bit_options(self) -> list[Bits | None]:
        """The bit widths each candidate is offered at; ``[None]`` for a float student."""
        bits = self.config.bits
        if not bits:
            return [None]
        if bits == "auto":
            return [parse_bits(b) for b in self.config.bit_choices.split(",")]
        return [parse_bits(bits)]

    def quantize_outside(self, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        """Fold and quantize the layers a quantized student has outside its blocks (in place).

        The first and last layers get ``first_last`` (8 bits by default: few weights, most
        sensitive); the rest of the stem and head the widest of the block choices' bits.
        """
        options = self.bit_options
        if options == [None]:
            return model
        first_last = (
            None if self.config.first_last == "same" else parse_bits(self.config.first_last)
        )
        widest = max(options, key=lambda b: (b[0] + b[1], b))
        return prepare_qat(model, QuantConfig(widest[0], widest[1], first_last), calibration)

    def teacher_block(self, spec: BlockSpec) -> nn.Module:
        return self.teacher.get_submodule(spec.name)

    @property
    def mode(self) -> str:
        """'archnet' when the target restricts operators (or when asked), else 'hant'."""
        if self.config.mode != "auto":
            return self.config.mode
        restricted = self.target.allowed_ops is not None or bool(self.target.rules)
        return "archnet" if restricted else "hant"

    def shell(self) -> tuple[nn.Module, list[tuple[str, str, str]]]:
        """The network the chosen blocks go into: the teacher, with its stem and head converted
        to the target's operators in Arch-Net mode; and the conversions made."""
        import copy

        shell = copy.deepcopy(self.teacher)
        if self.mode != "archnet":
            return shell, []
        from archnet.opconvert import convert_modules

        names = [s.name for s in self.specs]
        rows = convert_modules(shell, names)
        if self.target.rules.max_channels:
            rows += split_wide_layers(shell, self.target.rules.max_channels, names)
        return shell, rows


# --- creating a run --------------------------------------------------------------------------
def _as_image_data(data: ImageData | torch.Tensor | str, config: ConvertConfig) -> ImageData:
    if isinstance(data, ImageData):
        return data
    if isinstance(data, torch.Tensor):
        return ImageData(images=data.float(), labels=None, classes=None, source="tensor")
    from archnet.data import load_data

    c, h = config.input_size[0], config.input_size[1]
    return load_data(str(data), size=h, channels=c)


def create_run(
    teacher: nn.Module,
    data: ImageData | torch.Tensor | str,
    config: ConvertConfig,
    out: str | Path,
    eval_data: ImageData | str | None = None,
    resume: bool = False,
) -> Run:
    """Write the run directory's inputs: config, teacher, data splits, blocks."""
    root = Path(out)
    if root.exists() and (root / "state.json").exists():
        if not resume:
            raise ArchnetError(
                f"run directory {root} already holds a run; pass --resume to continue it "
                "or --out NEW_DIR to start another"
            )
        return Run(root, ConvertConfig.load(root / "config.toml"))
    config.validate()
    root.mkdir(parents=True, exist_ok=True)
    images = _as_image_data(data, config)
    if len(images) < 10:
        raise ArchnetError(f"data {images.source} has {len(images)} images; give at least 10")
    config.input_size = tuple(images.images.shape[1:])
    train, heldout = images.split(1.0 - config.heldout_fraction, seed=config.seed)
    if config.max_samples:
        train = train.subset(config.max_samples)
    if eval_data is not None:
        ev = eval_data if isinstance(eval_data, ImageData) else _as_image_data(eval_data, config)
    else:
        ev = heldout
    blob = {
        "train_images": train.images.half(),
        "heldout_images": heldout.images.half(),
        "eval_images": ev.images.half(),
        "eval_labels": ev.labels,
    }
    torch.save({k: v for k, v in blob.items() if v is not None}, root / "data.pt")
    teacher = teacher.eval().cpu()
    specs = find_blocks(teacher, config.input_size, config.blocks)
    torch.save(teacher, root / "teacher.pt")
    _write_json(
        root / "blocks.json",
        [
            {"name": s.name, "in_shape": list(s.in_shape), "out_shape": list(s.out_shape)}
            for s in specs
        ],
    )
    config.save(root / "config.toml")
    run = Run(root, config)
    run.mark_done(
        "prepare",
        {
            "blocks": len(specs),
            "train": len(train),
            "heldout": len(heldout),
            "eval": len(ev),
            "labelled_eval": ev.labels is not None,
        },
    )
    return run


def run_stages(run: Run, until: str | None = None) -> None:
    """Run every stage not yet done, in order, timing each."""
    for name, fn in STAGES.items():
        if name in run.state["done"]:
            continue
        console.print(f"[bold]stage[/] {name}")
        t0 = time.perf_counter()
        info = fn(run) or {}
        info["seconds"] = round(time.perf_counter() - t0, 2)
        run.mark_done(name, info)
        console.print(f"  done in {info['seconds']:.1f} s")
        if name == until:
            return


# --- stages ----------------------------------------------------------------------------------
@stage("features")
def _features(run: Run) -> dict[str, Any]:
    with progress_bar() as bar:
        for split in ("train", "heldout"):
            run.features.write(run.teacher, run.specs, run.images(split), split, progress=bar)
    return {}


@stage("candidates")
def _candidates(run: Run) -> dict[str, Any]:
    """Build every block's pool; keep only candidates the target can run."""
    from archnet.targets.opset import rejects

    pools: dict[str, Any] = {}
    rejected: dict[str, dict[str, str]] = {}
    for spec in run.specs:
        pool = build_pool(spec, run.teacher_block(spec), run.config.candidates.split(","))
        shape = (1, *spec.in_shape)
        kept = {}
        teacher_macs = count_macs(pool["teacher"], spec.in_shape)
        cap = run.config.max_macs_ratio
        if cap is None:
            cap = 1.5 if run.mode == "hant" else 0
        max_channels = run.target.rules.max_channels if run.mode == "archnet" else None
        costs = {}
        for name, module in pool.items():
            if max_channels:
                split_wide_layers(module, max_channels)
            macs = count_macs(module, spec.in_shape)
            params = count_params(module)
            # a quantized student is checked as it will run: as its QDQ graph
            sizes, checked = _choice_sizes(module, run.bit_options, spec)
            reason = rejects(run.target, checked, shape)
            if not reason and cap and name != "teacher" and macs > cap * max(teacher_macs, 1):
                reason = f"{macs / max(teacher_macs, 1):.1f}x the teacher block's MACs (cap {cap})"
            if reason:
                rejected.setdefault(spec.name, {})[name] = reason
                continue
            kept[name] = {"params": params, "macs": macs}
            for bits, size in sizes.items():
                costs[choice_name(name, bits)] = {"params": params, "macs": macs, "size_bits": size}
        if not kept:
            raise ArchnetError(
                f"block {spec.name}: no candidate runs on target {run.target.name}; "
                "widen --candidates or use another target"
            )
        pools[spec.name] = {"candidates": list(kept), "choices": list(costs), "costs": costs}
    _write_json(run.path("pool.json"), pools)
    _write_json(run.path("rejected.json"), rejected)
    sizes = [len(p["choices"]) for p in pools.values()]
    return {
        "pool_size": sum(sizes),
        "space_log10": float(np.sum(np.log10(sizes))),
        "rejected": sum(len(v) for v in rejected.values()),
    }


def _choice_sizes(
    module: nn.Module, options: list[Bits | None], spec: BlockSpec
) -> tuple[dict[Bits | None, int], nn.Module]:
    """Size in bits of ``module`` at each bit option, and the module to check on the target:
    the float module, or its quantized version in a quantized run."""
    if options == [None]:
        return {None: model_size_bits(module)}, module
    import copy

    quantized = quantize_from(copy.deepcopy(module), options[0], spec)
    weights = sum(m.weight.numel() for m in quantized.modules() if isinstance(m, QuantModule))
    rest = model_size_bits(quantized) - weights * options[0][0]
    if not is_quantized(quantized):
        options = options[:1]  # nothing to quantize (an identity skip): one choice is enough
    return {bits: rest + weights * bits[0] for bits in options}, quantized


@stage("latency")
def _latency(run: Run) -> dict[str, Any]:
    """Time every candidate at its real input shape, the outside parts and the whole teacher."""
    pools = _read_json(run.path("pool.json"))
    backend = run.target.latency_backend()
    cfg = run.config.latency
    with LatencyCache(run.path("latency.sqlite")) as cache, progress_bar() as bar:
        # every candidate, each teacher block (the reference, even where the target rejects it),
        # the outside parts and the whole teacher
        total = sum(len({"teacher", *p["choices"]}) for p in pools.values()) + 2
        task = bar.add_task(
            f"latency ({backend.name}, {backend.device}, {backend.threads} thread(s))", total=total
        )
        shell, _ = run.shell()
        table = block_latency_table(
            backend,
            cache,
            run.teacher,
            run.specs,
            pools,
            (run.batch_size, *run.config.input_size),
            cfg,
            on_done=lambda: bar.advance(task),
            shell=shell,
            quantize_outside=run.quantize_outside if run.bit_options != [None] else None,
        )
    _write_json(run.path("latency.json"), table)
    return {
        "teacher_ms": table["teacher_ms"],
        "predicted_teacher_ms": table["teacher_predicted_ms"],
        "cache_hits": table["cache_hits"],
    }


@stage("distill")
def _distill(run: Run) -> dict[str, Any]:
    jobs = run.jobs()
    cfg = run.config.blockwise
    n = len(run.data["train_images"])
    todo = [j for j in jobs if not j.path.exists() and j.name != "teacher"]
    blocks = {s.name: run.teacher_block(s) for s in run.specs}
    with progress_bar() as bar:
        task = bar.add_task(
            f"blockwise distillation ({len(jobs)} jobs, {len(jobs) - len(todo)} cached)",
            total=sum(steps_per_job(n, cfg, j.bits is not None) for j in todo),
        )
        per_job = bar.add_task("  candidates done", total=len(jobs))
        bar.update(per_job, completed=len(jobs) - len([j for j in jobs if not j.path.exists()]))

        def done(job: CandidateJob, metrics: dict) -> None:
            bar.advance(per_job)
            if cfg.workers > 1:
                bar.advance(task, steps_per_job(n, cfg, job.bits is not None))

        run_jobs(
            jobs,
            blocks,
            run.path("features"),
            cfg,
            run.config.seed,
            done,
            on_step=(lambda: bar.advance(task)) if cfg.workers <= 1 else None,
        )
    return {"candidates": len(jobs), "trained": len(todo)}


@stage("score")
def _score(run: Run) -> dict[str, Any]:
    """Replace-one-block KL (and top-1 where labelled) for every candidate on held-out data."""
    images = run.images("heldout")
    t_logits = torch.from_numpy(np.array(run.features.load("heldout", "logits")))
    labels = run.data.get("eval_labels")
    ev = run.images("eval") if labels is not None else None
    scores: dict[str, dict[str, Any]] = {}
    jobs = run.jobs(choices_only=True)
    with progress_bar() as bar:
        task = bar.add_task("replace-one-block scores", total=len(jobs))
        for job in jobs:
            module, metrics = load_candidate(job, run.teacher_block(job.spec))
            s = replace_one_block(run.teacher, job.spec.name, module, images, t_logits, ev, labels)
            s["val_nmse"] = metrics["val_nmse"]
            scores.setdefault(job.spec.name, {})[job.name] = s
            bar.advance(task)
    _write_json(run.path("scores.json"), scores)
    return {}


def search_table(run: Run) -> SearchTable:
    """The ILP's table from the cached pools, scores and latencies."""
    pools = _read_json(run.path("pool.json"))
    scores = _read_json(run.path("scores.json"))
    lat = _read_json(run.path("latency.json"))
    names = [s.name for s in run.specs]
    cands = [pools[b]["choices"] for b in names]

    def col(f: Callable[[str, str], float]) -> list[np.ndarray]:
        return [
            np.array([f(b, c) for c in cs], dtype=float)
            for b, cs in zip(names, cands, strict=False)
        ]

    return SearchTable(
        blocks=names,
        candidates=cands,
        score=col(lambda b, c: scores[b][c]["kl"]),
        costs={
            "latency_ms": col(lambda b, c: lat["blocks"][b][c]),
            "params": col(lambda b, c: pools[b]["costs"][c]["params"]),
            "macs": col(lambda b, c: pools[b]["costs"][c]["macs"]),
            "size_bits": col(lambda b, c: pools[b]["costs"][c]["size_bits"]),
        },
        offsets={
            "latency_ms": lat["outside_ms"],
            "params": lat["outside_params"],
            "macs": lat["outside_macs"],
            "size_bits": lat["outside_size_bits"],
        },
    )


def budgets(run: Run) -> dict[str, float]:
    """The config's budgets in absolute units.

    A relative latency budget resolves against the teacher's latency in the same table (the
    sum of its measured parts), so budget and candidates share one scale and the machine's
    drift between two measurements cannot loosen or tighten the ratio.
    """
    lat = _read_json(run.path("latency.json"))
    cfg = run.config
    teacher_ms = lat["teacher_predicted_ms"]
    out = {"latency_ms": parse_budget(cfg.budget, "latency").resolve(teacher_ms)}
    for key, what, text, ref in (
        ("params", "params", cfg.params_budget, lat["teacher_params"]),
        ("macs", "macs", cfg.macs_budget, lat["teacher_macs"]),
        ("size_bits", "size", cfg.size_budget, lat["teacher_size_bits"]),
    ):
        if text:
            out[key] = parse_budget(text, what).resolve(ref)
    return out


@stage("search")
def _search(run: Run) -> dict[str, Any]:
    table = search_table(run)
    lat = _read_json(run.path("latency.json"))
    limits = budgets(run)
    reference = {
        "latency_ms": lat["teacher_predicted_ms"],
        "params": lat["teacher_params"],
        "macs": lat["teacher_macs"],
        "size_bits": lat["teacher_size_bits"],
    }
    result = solve(table, limits, reference=reference)
    sweep = pareto_sweep(table, "latency_ms", extra_budgets=limits)
    _write_json(
        run.path("search.json"),
        {
            "budgets": limits,
            "budget_spec": run.config.budget,
            "result": result.to_json(),
            "pareto": [r.to_json() for r in sweep],
            "table": table.to_json(),
            "space_log10": table.space_size_log10(),
        },
    )
    plot_pareto(
        sweep, run.path("pareto.png"), reference={"teacher": lat["teacher_ms"]}, chosen=result
    )
    console.print(
        f"  chose {_summary(result)}; predicted {result.totals['latency_ms']:.3f} ms "
        f"(budget {limits['latency_ms']:.3f} ms, solved in {result.solve_time_s:.2f} s)"
    )
    return {"objective": result.objective, "predicted_ms": result.totals["latency_ms"]}


def _summary(result: SearchResult) -> str:
    kept = sum(parse_choice(n)[0] == "teacher" for n in result.names)
    return f"{len(result.names) - kept} of {len(result.names)} blocks replaced"


def chosen(run: Run) -> SearchResult:
    return SearchResult.from_json(_read_json(run.path("search.json"))["result"])


@stage("assemble")
def _assemble(run: Run) -> dict[str, Any]:
    """Build the student from the choices, then distill it end to end without labels."""
    student, conversions = build_student(run)
    before = evaluate(run, student)
    history = train_student(run, student, run.config.arch, "end-to-end distillation")
    torch.save(student, run.path("student.pt"))
    return {
        "mode": run.mode,
        "conversions": conversions,
        "teacher": evaluate(run, run.teacher),
        "before_finetune": before,
        "after_finetune": evaluate(run, student),
        "loss": history,
    }


def build_student(run: Run) -> tuple[nn.Module, list[tuple[str, str, str]]]:
    """The shell with the chosen candidates (trained blockwise) swapped in, not yet fine-tuned."""
    result = chosen(run)
    jobs = {(j.spec.name, j.name): j for j in run.jobs(choices_only=True)}
    replacements = {
        spec.name: load_candidate(jobs[(spec.name, name)], run.teacher_block(spec))[0]
        for spec, name in zip(run.specs, result.names)
        if name != "teacher"
    }
    shell, conversions = run.shell()
    student = assemble(shell, replacements)
    if run.mode == "archnet" and run.target.rules.max_channels:
        # candidates were trained unsplit; the split is exact, so it is applied once, here
        split_wide_layers(student, run.target.rules.max_channels)
    run.quantize_outside(student, run.images("train")[:256])
    return student, conversions


def train_student(run: Run, student: nn.Module, arch_cfg: Any, label: str) -> Any:
    """End-to-end label-free training: KD fine-tune (HANT) or Arch-Distillation (Arch-Net)."""
    images = run.images("train")
    names = [s.name for s in run.specs]
    with progress_bar() as bar:
        if run.mode == "archnet":
            from archnet.distill.archnet import arch_distill, total_steps

            task = bar.add_task(label, total=total_steps(len(images), len(names), arch_cfg))
            return arch_distill(
                student,
                run.teacher,
                images,
                names,
                arch_cfg,
                seed=run.config.seed,
                on_step=lambda _l: bar.advance(task),
            )
        cfg = run.config.finetune
        task = bar.add_task(label, total=cfg.epochs * -(-len(images) // cfg.batch_size))
        return finetune(
            student,
            run.teacher,
            images,
            cfg,
            names,
            seed=run.config.seed,
            on_step=lambda _l: bar.advance(task),
        )


def evaluate(run: Run, model: nn.Module) -> dict[str, float]:
    """KL from the teacher on held-out data, and top-1 on labelled eval data."""
    heldout = run.images("heldout")
    t_logits = torch.from_numpy(np.array(run.features.load("heldout", "logits")))
    from archnet.distill.losses import kd_kl

    out = {"kl": float(kd_kl(logits_of(model, heldout), t_logits))}
    labels = run.data.get("eval_labels")
    if labels is not None:
        out["top1"] = top1(logits_of(model, run.images("eval")), labels)
    return out


@stage("export")
def _export(run: Run) -> dict[str, Any]:
    from archnet.export import export_and_measure

    student = torch.load(run.path("student.pt"), map_location="cpu", weights_only=False).eval()
    return export_and_measure(run, run.teacher, student)


ABLATIONS = {
    "without Teacher Attention": {"teacher_attention": False},
    "without Residual Feature Adaptation": {"residual_adaptation": False},
    "without the progressive schedule": {"progressive": False},
}


@stage("ablation")
def _ablation(run: Run) -> dict[str, Any]:
    """Arch-Net mode: the same student trained with each training-only helper switched off."""
    if not run.config.ablation or run.mode != "archnet":
        return {"skipped": True}
    import dataclasses

    rows = {"full method": run.state["done"]["assemble"]["after_finetune"]}
    for label, switch in ABLATIONS.items():
        student, _ = build_student(run)
        train_student(run, student, dataclasses.replace(run.config.arch, **switch), label)
        rows[label] = evaluate(run, student)
    return {"rows": rows}


@stage("report")
def _report(run: Run) -> dict[str, Any]:
    from archnet.report import write_report

    write_report(run)
    return {}


def open_run(root: str | Path) -> Run:
    root = Path(root)
    if not (root / "state.json").exists():
        raise ArchnetError(
            f"{root} is not an archnet run directory (no state.json); "
            "pass --run DIR of an earlier `archnet convert`"
        )
    return Run(root, ConvertConfig.load(root / "config.toml"))


@dataclass
class ConversionResult:
    """What :func:`convert` hands back: the student, the report, and where everything lies."""

    student: nn.Module
    report: dict[str, Any]
    run_dir: Path


def finish(run: Run) -> ConversionResult:
    run_stages(run)
    student = torch.load(run.path("student.pt"), map_location="cpu", weights_only=False).eval()
    report = json.loads(run.path("report.json").read_text())
    return ConversionResult(student, report, run.root)


def convert(
    teacher: nn.Module,
    data: ImageData | torch.Tensor | str,
    target: str = "cpu-ort",
    budget: float | str = 0.5,
    out: str | Path = "runs/convert",
    eval_data: ImageData | str | None = None,
    resume: bool = False,
    config: ConvertConfig | None = None,
    **overrides: Any,
) -> ConversionResult:
    """Convert ``teacher`` into a student that meets ``budget`` on ``target``, label-free.

    ``data`` is unlabeled images (an ImageData, an (N, C, H, W) tensor, 'digits' or a path);
    ``budget`` is a fraction of the teacher's measured latency or a string such as '2.5ms'.
    Other :class:`ConvertConfig` fields can be given as keyword arguments.
    """
    cfg = config or ConvertConfig(model="python")
    cfg.target, cfg.budget = target, str(budget)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ArchnetError(f"convert() got unknown option {key!r}")
        setattr(cfg, key, value)
    return finish(create_run(teacher, data, cfg, out, eval_data=eval_data, resume=resume))
