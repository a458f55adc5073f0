"""Typed results the stages hand each other, kept in the run directory as JSON.

Each stage returns one of these; the run store writes it and reads it back for later stages, so
export and report work from plain values and can be tested without a run. A file that lacks a
field is corrupt (the stage runs again), never silently filled with a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from archnet.blocks import BlockSpec

R = TypeVar("R", bound="Result")


class CorruptResult(ValueError):
    """A result file that does not hold what its stage writes."""


@dataclass
class Result:
    """JSON round trip by field name."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        if not isinstance(data, dict):
            raise CorruptResult(f"expected an object, found {type(data).__name__}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise CorruptResult(f"missing {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class PrepareResult(Result):
    """What was fixed when the run was created: blocks, split sizes, input fingerprints."""

    blocks: list[dict[str, Any]]
    splits: dict[str, int]  # train / selection / eval image counts
    eval_source: str  # where the evaluation split came from, in words
    labelled_eval: bool
    input_size: list[int]
    fingerprint: str  # hash of teacher and data: part of every candidate job's key

    @property
    def specs(self) -> list[BlockSpec]:
        return [BlockSpec.from_dict(d) for d in self.blocks]


@dataclass
class PoolResult(Result):
    """Each block's pool: candidates, choices (candidate x bit width) and their costs."""

    pools: dict[str, dict[str, Any]]
    rejected: dict[str, dict[str, str]]  # block -> candidate -> why the target refuses it
    unserved: dict[str, str]  # block -> why nothing but the teacher's own block can go there

    @property
    def pool_size(self) -> int:
        return sum(len(p["choices"]) for p in self.pools.values())

    @property
    def space_log10(self) -> float:
        return float(sum(math.log10(len(p["choices"])) for p in self.pools.values()))


@dataclass
class LatencyTable(Result):
    """Measured times of every choice at its block's input shape, and of the outside parts."""

    backend: str
    device: str
    threads: int
    batch_size: int
    input_shape: list[int]
    blocks: dict[str, dict[str, float]]  # ms above the per-call floor
    teacher_blocks: dict[str, float]
    outside_ms: float  # the student's stem, head and glue (the search's offset)
    teacher_outside_ms: float
    overhead_ms: dict[str, float]  # the per-call floor per input shape
    teacher_ms: float  # the whole teacher, timed in the same stage
    teacher_predicted_ms: float  # its parts summed: what relative budgets refer to
    teacher_params: int
    teacher_macs: int
    outside_params: int
    outside_macs: int
    outside_size_bits: int
    teacher_size_bits: int
    cache_hits: int
    exporters: dict[str, Any] = field(default_factory=dict)
    platform: str = ""


@dataclass
class FeaturesResult(Result):
    splits: dict[str, int]  # images whose block features were cached, per split


@dataclass
class DistillResult(Result):
    jobs: int
    trained: int
    val_nmse: dict[str, dict[str, float]]  # block -> choice -> NMSE on the selection split


@dataclass
class ScoreResult(Result):
    """Replace-one-block scores per block and choice, on the selection split."""

    scores: dict[str, dict[str, dict[str, float]]]


@dataclass
class SearchOutcome(Result):
    budgets: dict[str, float]  # as asked, in absolute units
    limits: dict[str, float]  # as enforced: the latency budget less the margin
    budget_spec: str
    result: dict[str, Any]  # search.SearchResult.to_json()
    pareto: list[dict[str, Any]]
    table: dict[str, Any]  # search.SearchTable.to_json()
    # with rerank: every student tried, best of the ILP first (names, objective,
    # predicted_latency_ms, kl_assembled, kl_recovered); empty without
    reranked: list[dict[str, Any]]

    @property
    def names(self) -> list[str]:
        return list(self.result["names"])


@dataclass
class AssembleResult(Result):
    """The student as built and trained end to end, with what was kept and why."""

    mode: str
    conversions: list[list[str]]  # [module, was, now] for each converted outside layer
    changed: list[
        str
    ]  # modules the student changed: only their BatchNorm statistics are re-estimated
    kept: str  # "fine-tuned" or "assembled" (the end-to-end stage did not help on the selection split)
    selection: dict[str, dict[str, float]]  # before / after end-to-end training, selection split
    loss: Any
    params: int  # counted on the built student
    macs: int
    size_bits: int  # packed: every weight at its bit width


@dataclass
class EvaluationResult(Result):
    """Teacher and student on the evaluation split, which no choice was made on."""

    images: int
    labelled: bool
    teacher: dict[str, float]
    student: dict[str, float]
    agreement: dict[str, float]  # argmax agreement, relative MSE and cosine of the outputs
    warnings: list[str]

    POOR_ARGMAX: ClassVar[float] = 0.9
    POOR_RELATIVE_MSE: ClassVar[float] = 0.25


@dataclass
class ExportResult(Result):
    input_shape: list[int]
    max_abs_diff: dict[str, float]  # per exported network, ONNX vs PyTorch
    ops: dict[str, list[str]]
    check: dict[str, Any]  # violations / unverified of the student against the target
    exporters: dict[str, str]
    backend: str
    device: str
    threads: int
    ms: dict[str, float]  # whole networks, timed interleaved in one run
    sum_of_parts_ms: dict[str, float]  # their parts, timed in the same run
    sizes: dict[str, dict[str, int]]  # per network: ONNX file bytes and initializer bytes
    quantization: dict[str, Any] | None = None


@dataclass
class AblationResult(Result):
    """Arch-Distillation with each training-only aid switched off, over several seeds."""

    seeds: list[int]
    rows: dict[str, dict[str, list[float]]]  # variant -> metric -> one value per seed
    skipped: bool = False
