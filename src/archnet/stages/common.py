"""What several stages derive from a run: its mode, bit options, jobs, the student's shell."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from archnet.blocks import BlockSpec
from archnet.choices import Bits
from archnet.config import ConvertConfig
from archnet.distill.blockwise import CandidateJob
from archnet.errors import ArchnetError
from archnet.quant import QuantConfig, parse_bits, prepare_qat
from archnet.results import PoolResult
from archnet.store import RunStore
from archnet.targets import Target, load_target
from archnet.tasks import Task, get_task

console = Console(stderr=True)


def task(store: RunStore) -> Task:
    """The run's task: what its data and outputs are (see ``archnet.tasks``)."""
    return get_task(store.config.task)


@contextmanager
def progress_bar() -> Iterator[Progress]:
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


def warn(text: str) -> None:
    console.print(f"[bold yellow]warning:[/] {text}", highlight=False)


def target(store: RunStore) -> Target:
    return load_target(store.config.target)


def mode(store: RunStore) -> str:
    return resolve_mode(store.config)


def resolve_mode(config: ConvertConfig) -> str:
    """'archnet' when the target restricts operators (or when asked), else 'hant'."""
    if config.mode != "auto":
        return config.mode
    t = load_target(config.target)
    return "archnet" if t.allowed_ops is not None or bool(t.rules) else "hant"


def batch_size(store: RunStore) -> int:
    return store.config.latency.batch_size or target(store).batch_size


def input_shape(store: RunStore) -> tuple[int, ...]:
    """The batched input shape latency and export use."""
    return (batch_size(store), *store.prepared.input_size)


def specs(store: RunStore) -> list[BlockSpec]:
    return store.prepared.specs


def teacher_block(store: RunStore, spec: BlockSpec) -> nn.Module:
    return store.teacher.get_submodule(spec.name)


def bit_options(store: RunStore) -> list[Bits | None]:
    """The bit widths each candidate is offered at; ``[None]`` for a float student."""
    bits = store.config.bits
    if not bits:
        return [None]
    if bits == "auto":
        return [parse_bits(b) for b in store.config.bit_choices.split(",")]
    return [parse_bits(bits)]


def quantize_outside(store: RunStore, model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """Fold and quantize the layers a quantized student has outside its blocks; returns the
    model to use (traced when requantization points were added).

    The first and last layers get ``first_last`` (8 bits by default: few weights, most
    sensitive); the rest of the stem and head the widest of the block choices' bits.
    """
    options = bit_options(store)
    if options == [None]:
        return model
    first_last = None if store.config.first_last == "same" else parse_bits(store.config.first_last)
    widest = max(options, key=lambda b: (b[0] + b[1], b))
    cfg = QuantConfig(widest[0], widest[1], first_last, requantize=target(store).requantize)
    blocks = tuple(s.name for s in specs(store))
    return prepare_qat(model, cfg, calibration, keep=blocks)


def shell(store: RunStore) -> tuple[nn.Module, list[list[str]]]:
    """The network the chosen blocks go into: the teacher, with its stem and head converted
    to the target's operators in Arch-Net mode; and the conversions made."""
    from archnet.plan import convert_shell

    net, rows = convert_shell(
        store.teacher, specs(store), target(store), mode(store), input_shape(store)
    )
    return net, [list(r) for r in rows]


def jobs(store: RunStore, pools: PoolResult, choices_only: bool = False) -> list[CandidateJob]:
    """Training jobs: every float candidate (quantized choices start from them) and every
    choice of the search; ``choices_only`` keeps just the choices."""
    out = []
    requantize = target(store).requantize
    for i, spec in enumerate(specs(store)):
        pool = pools.pools[spec.name]
        names = (
            pool["choices"] if choices_only else dict.fromkeys(pool["candidates"] + pool["choices"])
        )
        out += [
            CandidateJob(
                i,
                spec,
                name,
                store.path(f"candidates/{i:03d}_{spec.name}/{name}.pt"),
                requantize=requantize,
            )
            for name in names
        ]
    return out


def device(store: RunStore) -> str:
    """The device training and scoring run on (``config.device``, ``auto`` resolved)."""
    from archnet.device import resolve_device

    return str(resolve_device(store.config.device))


def executor(store: RunStore):
    """The executor of the run's jobs (``config.executor``; see :mod:`archnet.executors`)."""
    from archnet.executors import build_executor

    c = store.config
    name = c.executor
    if name == "auto":
        name = "process" if c.blockwise.workers > 1 else "inprocess"
    return build_executor(
        name, workers=c.blockwise.workers, address=c.ray_address, gpus=c.gpus_per_job
    )


def job_board(store: RunStore, stage: str, total: int, done: int, executor):
    """A fresh :class:`~archnet.jobboard.JobBoard` for ``stage``, saved (``archnet status``)."""
    from archnet.jobboard import JOBS_FILE, JobBoard

    board = JobBoard(
        store.path(JOBS_FILE), stage, total, done, slots=executor.slots, executor=executor.name
    )
    board.save()
    return board


def raise_failed(what: str, failures: list, tried: int) -> None:
    """One error for the jobs that failed (the others are kept: a resumed run retries these)."""
    if failures:
        job, error = failures[0]
        raise ArchnetError(
            f"{len(failures)} of {tried} {what} job(s) failed (first: {job.spec.name}/{job.name}: "
            f"{error}); the others are kept: fix the cause and continue with --resume"
        )
