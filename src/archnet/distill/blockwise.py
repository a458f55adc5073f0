"""Blockwise feature-map distillation of candidate operations (HANT/LANA).

Every candidate is an independent job (:func:`train_job`, a pure function): it reads the
cached teacher input of its block, regresses the cached teacher output (normalized MSE), and
returns its checkpoint as bytes, which the driver writes (atomically) under the job's content
key. Jobs are deterministic per seed and a checkpoint holding its job's key is never trained
again, so a killed run resumes where it stopped and a changed setting retrains exactly the
jobs it touches. Jobs run on any :mod:`archnet.executors` executor (this process, local
processes, Ray) and on any ``--device``.

A quantized choice ('mbconv_k3@w4a4') is a second job on the same features: it starts from
its trained float candidate, folds batch norm, quantizes, and is trained again (quantization
while distilling, as Arch-Net does), so float jobs run first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.candidates import build_candidate
from archnet.choices import Bits, build_choice, parse_choice, quantize_from
from archnet.context import BlockContext, call_block
from archnet.device import autocast, to_device
from archnet.distill.bn import recalibrate_bn
from archnet.distill.finetune import out_of_place
from archnet.distill.losses import nmse
from archnet.errors import ArchnetError
from archnet.executors import Executor, InProcessExecutor, Job
from archnet.features import FEATURES_VERSION, FeatureCache
from archnet.quant import QUANTIZER_VERSION


@dataclass
class BlockwiseConfig:
    """How long and how hard each candidate is trained against its block's teacher features."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_samples: int | None = None  # cap on training features per candidate (None: all)
    workers: int = 1  # processes; 1 trains in this process
    amp: bool = False  # mixed precision (bfloat16 autocast) while training
    # quantized choices: further training after quantizing the trained float candidate
    quant_epochs: int = 4
    quant_lr: float = 1e-3

    def for_job(self, quantized: bool) -> BlockwiseConfig:
        """The schedule of a float or of a quantized job."""
        if not quantized:
            return self
        return dataclasses.replace(self, epochs=self.quant_epochs, lr=self.quant_lr)


# the settings a float job's result depends on (workers only decide where it runs)
_FLOAT_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "max_samples")


def _digest(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class CandidateJob:
    """One candidate (or choice) of one block to train; ``fingerprint`` names the teacher and
    data its features come from, so a job of another teacher never counts as done."""

    block_index: int
    spec: BlockSpec
    name: str
    path: Path
    fingerprint: str = ""
    requantize: bool = True  # the target's quantization points (Target.requantize)

    @property
    def candidate(self) -> str:
        return parse_choice(self.name)[0]

    @property
    def bits(self) -> Bits | None:
        return parse_choice(self.name)[1]

    def seed(self, base: int) -> int:
        """A seed per (run seed, block, candidate): reordering jobs never changes a result."""
        digest = hashlib.sha1(f"{base}:{self.spec.name}:{self.name}".encode()).hexdigest()
        return int(digest[:8], 16)

    def key(self, cfg: BlockwiseConfig, base_seed: int) -> str:
        """A hash of everything the job's result depends on: a checkpoint counts as done only
        when it holds this key, so a changed setting, seed or teacher retrains the job.

        A quantized choice depends on its float candidate's key and the quantized schedule.
        """
        float_seed = dataclasses.replace(self, name=self.candidate).seed(base_seed)
        settings = {f: getattr(cfg, f) for f in _FLOAT_FIELDS}
        if cfg.amp:  # only when on, so runs without it keep their keys
            settings["amp"] = True
        source = (self.fingerprint, FEATURES_VERSION)
        key = _digest(source, asdict(self.spec), self.candidate, settings, float_seed)
        if self.bits is None:
            return key
        quant = (cfg.quant_epochs, cfg.quant_lr, cfg.batch_size, cfg.max_samples)
        quant += (QUANTIZER_VERSION,) + (() if self.requantize else ("inputs",))
        return _digest(key, self.name, quant, self.seed(base_seed))

    def done(self, cfg: BlockwiseConfig, base_seed: int) -> bool:
        """Whether a readable checkpoint with this job's key exists."""
        ckpt = read_checkpoint(self.path)
        return ckpt is not None and ckpt.get("key") == self.key(cfg, base_seed)


def read_checkpoint(path: Path) -> dict | None:
    """A job checkpoint, or None when it is missing or unreadable (truncated, foreign)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # missing, truncated or foreign files raise many types
        return None
    return ckpt if isinstance(ckpt, dict) and "state_dict" in ckpt else None


def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for lo in range(0, n, batch_size):
        yield np.sort(order[lo : lo + batch_size])


def _tensor(arr: np.ndarray, idx: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr[idx], dtype=np.float32)).to(device)


def _context(
    context: BlockContext | None, idx: np.ndarray, device: torch.device | str = "cpu"
) -> dict | None:
    return to_device(context.batch(idx), device) if context else None


@torch.no_grad()
def evaluate_nmse(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 256,
    context: BlockContext | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """Held-out normalized MSE of a block (moved to ``device``), sample-weighted over batches."""
    module.eval().to(device)
    total, n = 0.0, len(x)
    for idx in _batches(n, batch_size, None):
        out = call_block(module, _tensor(x, idx, device), _context(context, idx, device))
        total += nmse(out.float(), _tensor(y, idx, device)).item() * len(idx)
    return total / max(n, 1)


def train_block(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: BlockwiseConfig,
    seed: int,
    on_step: Callable[[], None] | None = None,
    context: BlockContext | None = None,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Regress ``y`` from ``x`` (and the block's ``context``) with Adam + cosine decay, on
    ``device`` (the module is moved there); returns the per-epoch training loss."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(x) if cfg.max_samples is None else min(len(x), cfg.max_samples)
    params = [p for p in module.parameters() if p.requires_grad]
    history: list[float] = []
    if not params or cfg.epochs == 0:
        return history
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.15)
    module.to(device).train()
    for _ in range(cfg.epochs):
        total = 0.0
        for idx in _batches(n, cfg.batch_size, rng):
            with autocast(device, cfg.amp):
                out = call_block(module, _tensor(x, idx, device), _context(context, idx, device))
            loss = nmse(out.float(), _tensor(y, idx, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            if on_step:
                on_step()
        history.append(total / n)
    batches = (
        (_tensor(x, idx, device), _context(context, idx, device)) for idx in _batches(n, 256, None)
    )
    recalibrate_bn(module, batches, forward=lambda m, batch: call_block(m, *batch))
    module.eval()
    return history


def steps_per_job(n: int, cfg: BlockwiseConfig, quantized: bool = False) -> int:
    cfg = cfg.for_job(quantized)
    n = n if cfg.max_samples is None else min(n, cfg.max_samples)
    return cfg.epochs * math.ceil(n / cfg.batch_size)


@dataclass
class TrainShared:
    """What every candidate job of a run reads: the teacher's blocks (by name), the feature
    cache (a path every worker can reach; a job reads only its block's files), the schedule,
    the run seed and the device. ``on_step`` is called per step in-process only."""

    teacher_blocks: dict[str, nn.Module]
    cache_root: str
    cfg: BlockwiseConfig
    base_seed: int
    device: str = "cpu"
    on_step: Callable[[], None] | None = None


def train_candidate(
    job: CandidateJob, shared: TrainShared, float_state: dict | None = None
) -> tuple[nn.Module, dict]:
    """Build and train one candidate (a quantized one from ``float_state``, its trained float
    candidate's weights); returns it (on the CPU) and its metrics."""
    cfg, base_seed, device = shared.cfg, shared.base_seed, shared.device
    teacher_block = shared.teacher_blocks[job.spec.name]
    cache = FeatureCache(shared.cache_root)
    x, y = cache.block("train", job.block_index)
    context = cache.context("train", job.block_index, job.spec)
    trained = job.name != "teacher"  # the teacher's own block is the reference: nothing to learn
    if job.bits is not None:
        module = _quantized_start(job, teacher_block, x, float_state)
        init = f"float {job.candidate}"
    elif trained:
        module, init = _best_start(job, teacher_block, x, y, base_seed, context)
    else:
        module, init = build_candidate(job.name, job.spec, teacher_block), "teacher"
    out_of_place(module)  # autograd needs what an in-place activation would overwrite
    job_cfg = cfg.for_job(job.bits is not None)
    seed = job.seed(base_seed)
    history = (
        train_block(module, x, y, job_cfg, seed, shared.on_step, context, device) if trained else []
    )
    xv, yv = cache.block("selection", job.block_index)
    selection = cache.context("selection", job.block_index, job.spec)
    metrics = {
        "block": job.spec.name,
        "candidate": job.name,
        "train_loss": history,
        "val_nmse": evaluate_nmse(module, xv, yv, context=selection, device=device),
        "init": init,
        "config": asdict(job_cfg),
    }
    return module.cpu(), metrics


def train_job(shared: TrainShared, job: CandidateJob, needed: dict | None) -> dict:
    """A candidate job as a pure function: ``{"key", "checkpoint" (bytes), "metrics"}``;
    ``needed`` is the float job's result when ``job`` is a quantized choice."""
    float_state = _state(needed["checkpoint"]) if needed else None
    module, metrics = train_candidate(job, shared, float_state)
    key = job.key(shared.cfg, shared.base_seed)
    buffer = io.BytesIO()
    torch.save({"state_dict": module.state_dict(), "metrics": metrics, "key": key}, buffer)
    return {"key": key, "checkpoint": buffer.getvalue(), "metrics": metrics}


def _state(checkpoint: bytes) -> dict:
    return torch.load(io.BytesIO(checkpoint), map_location="cpu", weights_only=False)["state_dict"]


def write_checkpoint(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a killed driver leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _needs_float(job: CandidateJob) -> bool:
    return job.bits is not None and job.candidate != "teacher"


def _best_start(
    job: CandidateJob,
    teacher_block: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    base_seed: int,
    context: BlockContext | None = None,
) -> tuple[nn.Module, str]:
    """The candidate from teacher weights or from random init, whichever starts closer.

    Inheriting channel slices and kernel crops is a good start when the structures resemble
    each other and a bad one when they do not (a dense 3x3 block seeded from a depthwise
    block); one forward over a few features decides, per candidate.
    """
    n = min(len(x), 256)
    starts = {}
    for init, teacher in (("teacher", teacher_block), ("random", None)):
        torch.manual_seed(job.seed(base_seed))
        module = build_candidate(job.name, job.spec, teacher)
        if module is not None:  # a candidate cut from the teacher has no random start
            starts[init] = module
    errors = {init: evaluate_nmse(m, x[:n], y[:n], context=context) for init, m in starts.items()}
    best = min(errors, key=errors.get)
    return starts[best], best


def _quantized_start(
    job: CandidateJob, teacher_block: nn.Module, x: np.ndarray, float_state: dict | None
) -> nn.Module:
    """The trained float candidate (or the teacher's block), folded and quantized, with steps
    initialised from its own training inputs."""
    module = build_candidate(job.candidate, job.spec, teacher_block)
    if job.candidate != "teacher":
        if float_state is None:
            raise ArchnetError(f"{job.spec.name}/{job.name} needs its trained float candidate")
        module.load_state_dict(float_state)
    calibration = _tensor(x, np.arange(min(len(x), 256)))
    return quantize_from(module, job.bits, job.spec, calibration, job.requantize)


def plan_jobs(
    jobs: list[CandidateJob], cfg: BlockwiseConfig, base_seed: int
) -> tuple[list[Job], dict[str, Any]]:
    """The executor's jobs for those of ``jobs`` not done yet, each keyed by its content hash
    and a quantized one after its float job; and the results they need of jobs done before
    (a float checkpoint read from disk)."""
    todo = [j for j in jobs if not j.done(cfg, base_seed)]
    keys = {id(j): j.key(cfg, base_seed) for j in jobs}
    floats = {(j.block_index, j.name): j for j in jobs if j.bits is None}
    todo_keys = {keys[id(j)] for j in todo}
    needed: dict[str, Any] = {}
    work = []
    for job in todo:
        after = None
        if _needs_float(job):
            source = floats.get((job.block_index, job.candidate))
            if source is None:
                raise ArchnetError(f"{job.spec.name}/{job.name}: no float job {job.candidate}")
            after = keys[id(source)]
            if after not in todo_keys:  # trained earlier: its checkpoint is on disk
                needed[after] = {"checkpoint": source.path.read_bytes()}
        work.append(Job(keys[id(job)], job, after, f"{job.spec.name}/{job.name}"))
    return work, needed


def run_jobs(
    jobs: list[CandidateJob],
    teacher_blocks: dict[str, nn.Module],
    cache_root: str | Path,
    cfg: BlockwiseConfig,
    base_seed: int,
    on_job_done: Callable[[CandidateJob, dict], None],
    on_step: Callable[[], None] | None = None,
    executor: Executor | None = None,
    device: str = "cpu",
    on_job_failed: Callable[[CandidateJob, str], None] | None = None,
) -> list[tuple[CandidateJob, str]]:
    """Run the jobs not done yet (see :meth:`CandidateJob.done`) on ``executor`` (default:
    this process) and write each checkpoint as it arrives. A quantized job starts from its
    float job's result as soon as that exists. Returns the failed jobs with their errors; the
    others are written, so a resumed run retries only the failed ones."""
    executor = executor or InProcessExecutor()
    work, needed = plan_jobs(jobs, cfg, base_seed)
    shared = TrainShared(dict(teacher_blocks), str(cache_root), cfg, base_seed, device)
    shared.on_step = on_step if executor.in_process else None
    failed = []
    for outcome in executor.run(train_job, shared, work, needed):
        job = outcome.job.payload
        if outcome.error:
            failed.append((job, outcome.error))
            if on_job_failed:
                on_job_failed(job, outcome.error)
            continue
        write_checkpoint(job.path, outcome.result["checkpoint"])
        on_job_done(job, outcome.result["metrics"])
    return failed


def trained_checkpoint(job: CandidateJob) -> dict:
    """A trained job's checkpoint; one line saying what to do when it is missing or damaged."""
    ckpt = read_checkpoint(job.path)
    if ckpt is None:
        raise ArchnetError(
            f"candidate checkpoint {job.path} is missing or unreadable; resume the run to "
            "train it again"
        )
    return ckpt


def load_candidate(
    job: CandidateJob, teacher_block: nn.Module, ckpt: dict | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild a trained candidate from its checkpoint (``ckpt``, read already, or its file)."""
    ckpt = trained_checkpoint(job) if ckpt is None else ckpt
    module = build_choice(job.name, job.spec, teacher_block, requantize=job.requantize)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), ckpt["metrics"]
