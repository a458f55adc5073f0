"""The settings of a translation conversion, and which stage reads which of them.

A resumed run compares the stored settings with the new ones: a stage whose settings changed
runs again, and so does every stage after it; settings that fix the data (teacher, corpus,
seed) cannot change on resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from archnet.config import read_toml
from archnet.errors import ArchnetError
from archnet.quant.api import parse_bits
from archnet.seq2seq.distill import Seq2SeqDistillConfig

__all__ = ["FIXED", "STAGE_SETTINGS", "TranslationConfig"]


@dataclass
class TranslationConfig:
    """One translation conversion. ``bits`` lists the quantized students to train from the
    float student (``"w4a4,w2a4"``); ``budget`` is HANT's latency budget, a fraction of the
    teacher's measured translation latency."""

    model: str = ""
    data: str = "bible"
    eval_data: str | None = None
    target: str = "archnet-transformer"
    bits: str = ""
    budget: float | None = None
    seed: int = 0
    max_train: int = 12000  # source sentences the student learns from (the teacher translates them)
    max_selection: int = 400
    max_test: int | None = None  # None: every test pair
    max_len: int = 128  # source tokens (</s> included); longer sentences are cut
    max_new: int = 128  # output tokens per sentence at most
    beams: int = 1  # the reported BLEU's decoding (greedy by default)
    qat_steps: int = 700
    distill: Seq2SeqDistillConfig = field(default_factory=Seq2SeqDistillConfig)
    hant_steps: int = 200  # blockwise training steps (every candidate trains on each batch)
    hant_finetune_steps: int = 2000
    latency_batch: int = 8  # sentences per timed translation
    latency_repeats: int = 15  # interleaved rounds: each times every model once

    def __post_init__(self) -> None:
        if isinstance(self.distill, dict):
            self.distill = Seq2SeqDistillConfig(**self.distill)
        for spec in self.bit_list:
            try:
                parse_bits(spec)
            except ValueError as e:
                raise ArchnetError(f"--bits: {e}") from None
        if self.budget is not None and not self.budget > 0:
            raise ArchnetError(f"--budget {self.budget} must be positive (0.6: 60% of the teacher)")

    @property
    def bit_list(self) -> list[str]:
        return [b.strip().lower() for b in self.bits.split(",") if b.strip()]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TranslationConfig:
        """Settings from a dict; an unknown key (a typo) is an error, never ignored."""
        for known, data, where in (
            ({f.name for f in fields(cls)}, d, ""),
            ({f.name for f in fields(Seq2SeqDistillConfig)}, d.get("distill") or {}, "distill."),
        ):
            unknown = sorted(set(data) - known)
            if unknown:
                raise ArchnetError(
                    f"{source}: unknown setting {where}{unknown[0]}; known: {', '.join(sorted(known))}"
                )
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> TranslationConfig:
        """Settings from a TOML file (the keys of this class; ``[distill]`` for the schedule)."""
        return cls.from_dict(read_toml(path), str(path))

    def key(self, stage: str) -> str:
        """A hash of the settings ``stage`` and the stages before it read."""
        upto = STAGE_ORDER[: STAGE_ORDER.index(stage) + 1]
        wanted = [s for name in upto for s in STAGE_SETTINGS[name]]
        if self.budget is not None and "student" in upto:  # HANT times its choices
            wanted += LATENCY_SETTINGS
        values = {k: self._get(k) for k in FIXED + wanted}
        return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[
            :16
        ]

    def _get(self, dotted: str):
        obj = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj


# Settings that fix the data every stage reads: a resumed run refuses to change them.
FIXED = ["model", "data", "eval_data", "seed", "max_train", "max_selection", "max_test", "max_len"]
# How whole translations are timed: by the export stage, and by HANT's search under a budget
LATENCY_SETTINGS = ["latency_batch", "latency_repeats"]
# What each stage reads beyond FIXED (earlier stages' settings are included by `key`).
STAGE_SETTINGS = {
    "prepare": ["max_new"],
    "student": ["target", "budget", "distill", "hant_steps", "hant_finetune_steps"],
    "quantize": ["bits", "qat_steps"],
    "evaluate": ["beams"],
    "export": LATENCY_SETTINGS,
    "report": [],
}
STAGE_ORDER = list(STAGE_SETTINGS)
