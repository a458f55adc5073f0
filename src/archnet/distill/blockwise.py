"""Blockwise feature-map distillation of candidate operations (HANT/LANA).

Every candidate is an independent job: it reads the cached teacher input of its block,
regresses the cached teacher output (normalized MSE), and writes one checkpoint file. Jobs
are deterministic per seed and a finished checkpoint is never trained again, so a killed run
resumes where it stopped. Jobs run in-process or over a pool of processes.

A quantized choice ('mbconv_k3@w4a4') is a second job on the same features: it starts from
its trained float candidate, folds batch norm, quantizes, and is trained again (quantization
while distilling, as Arch-Net does), so float jobs run first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.candidates import build_candidate
from archnet.choices import Bits, build_choice, parse_choice, quantize_from
from archnet.context import BlockContext, call_block
from archnet.distill.bn import recalibrate_bn
from archnet.distill.losses import nmse
from archnet.errors import ArchnetError
from archnet.features import FeatureCache
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

    @property
    def candidate(self) -> str:
        return parse_choice(self.name)[0]

    @property
    def bits(self) -> Bits | None:
        return parse_choice(self.name)[1]

    @property
    def float_path(self) -> Path:
        """The checkpoint a quantized job starts from: its float candidate's."""
        return self.path.with_name(f"{self.candidate}.pt")

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
        key = _digest(self.fingerprint, asdict(self.spec), self.candidate, settings, float_seed)
        if self.bits is None:
            return key
        quant = (cfg.quant_epochs, cfg.quant_lr, cfg.batch_size, cfg.max_samples)
        quant += (QUANTIZER_VERSION,)
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


def _tensor(arr: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr[idx], dtype=np.float32))


def _context(context: BlockContext | None, idx: np.ndarray) -> dict | None:
    return context.batch(idx) if context else None


@torch.no_grad()
def evaluate_nmse(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 256,
    context: BlockContext | None = None,
) -> float:
    """Held-out normalized MSE of a block, sample-weighted over batches."""
    module.eval()
    total, n = 0.0, len(x)
    for idx in _batches(n, batch_size, None):
        out = call_block(module, _tensor(x, idx), _context(context, idx))
        total += nmse(out, _tensor(y, idx)).item() * len(idx)
    return total / max(n, 1)


def train_block(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: BlockwiseConfig,
    seed: int,
    on_step: Callable[[], None] | None = None,
    context: BlockContext | None = None,
) -> list[float]:
    """Regress ``y`` from ``x`` (and the block's ``context``) with Adam + cosine decay;
    returns the per-epoch training loss."""
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
    module.train()
    for _ in range(cfg.epochs):
        total = 0.0
        for idx in _batches(n, cfg.batch_size, rng):
            out = call_block(module, _tensor(x, idx), _context(context, idx))
            loss = nmse(out, _tensor(y, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            if on_step:
                on_step()
        history.append(total / n)
    batches = ((_tensor(x, idx), _context(context, idx)) for idx in _batches(n, 256, None))
    recalibrate_bn(module, batches, forward=lambda m, batch: call_block(m, *batch))
    module.eval()
    return history


def steps_per_job(n: int, cfg: BlockwiseConfig, quantized: bool = False) -> int:
    cfg = cfg.for_job(quantized)
    n = n if cfg.max_samples is None else min(n, cfg.max_samples)
    return cfg.epochs * math.ceil(n / cfg.batch_size)


def run_job(
    job: CandidateJob,
    teacher_block: nn.Module,
    cache_root: str,
    cfg: BlockwiseConfig,
    base_seed: int,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Build, train and checkpoint one candidate; returns its metrics."""
    cache = FeatureCache(cache_root)
    x, y = cache.block("train", job.block_index)
    context = cache.context("train", job.block_index, job.spec)
    trained = job.name != "teacher"  # the teacher's own block is the reference: nothing to learn
    if job.bits is not None:
        module, init = _quantized_start(job, teacher_block, x), f"float {job.candidate}"
    elif trained:
        module, init = _best_start(job, teacher_block, x, y, base_seed, context)
    else:
        module, init = build_candidate(job.name, job.spec, teacher_block), "teacher"
    job_cfg = cfg.for_job(job.bits is not None)
    seed = job.seed(base_seed)
    history = train_block(module, x, y, job_cfg, seed, on_step, context) if trained else []
    xv, yv = cache.block("selection", job.block_index)
    selection = cache.context("selection", job.block_index, job.spec)
    metrics = {
        "block": job.spec.name,
        "candidate": job.name,
        "train_loss": history,
        "val_nmse": evaluate_nmse(module, xv, yv, context=selection),
        "init": init,
        "config": asdict(job_cfg),
    }
    job.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.path.with_suffix(".tmp")
    ckpt = {"state_dict": module.state_dict(), "metrics": metrics, "key": job.key(cfg, base_seed)}
    torch.save(ckpt, tmp)
    tmp.replace(job.path)  # atomic: a killed job leaves no half-written checkpoint
    return metrics


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


def _quantized_start(job: CandidateJob, teacher_block: nn.Module, x: np.ndarray) -> nn.Module:
    """The trained float candidate (or the teacher's block), folded and quantized, with steps
    initialised from its own training inputs."""
    module = build_candidate(job.candidate, job.spec, teacher_block)
    if job.candidate != "teacher":
        module.load_state_dict(torch.load(job.float_path, map_location="cpu")["state_dict"])
    calibration = _tensor(x, np.arange(min(len(x), 256)))
    return quantize_from(module, job.bits, job.spec, calibration)


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_job_worker(args: tuple) -> dict:
    return run_job(*args)


def run_jobs(
    jobs: list[CandidateJob],
    teacher_blocks: dict[str, nn.Module],
    cache_root: str | Path,
    cfg: BlockwiseConfig,
    base_seed: int,
    on_job_done: Callable[[CandidateJob, dict], None],
    on_step: Callable[[], None] | None = None,
) -> None:
    """Run the jobs not done yet (see :meth:`CandidateJob.done`), in-process or over
    ``cfg.workers`` processes. Float jobs run before quantized ones, which start from them.
    """
    todo = [j for j in jobs if not j.done(cfg, base_seed)]
    phases = [[j for j in todo if j.bits is None], [j for j in todo if j.bits is not None]]
    if cfg.workers <= 1:
        for job in phases[0] + phases[1]:
            on_job_done(
                job,
                run_job(
                    job, teacher_blocks[job.spec.name], str(cache_root), cfg, base_seed, on_step
                ),
            )
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(cfg.workers, mp.get_context("spawn"), _worker_init) as pool:
        for phase in phases:
            args = [
                (j, teacher_blocks[j.spec.name], str(cache_root), cfg, base_seed) for j in phase
            ]
            for job, metrics in zip(phase, pool.map(_run_job_worker, args), strict=False):
                on_job_done(job, metrics)


def load_candidate(job: CandidateJob, teacher_block: nn.Module) -> tuple[nn.Module, dict]:
    """Rebuild a trained candidate from its checkpoint."""
    ckpt = read_checkpoint(job.path)
    if ckpt is None:
        raise ArchnetError(
            f"candidate checkpoint {job.path} is missing or unreadable; resume the run to "
            "train it again"
        )
    module = build_choice(job.name, job.spec, teacher_block)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), ckpt["metrics"]
