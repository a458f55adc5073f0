"""A conversion's settings as small dataclasses; TOML in, the resolved TOML written to the run."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from archnet.distill.archnet import ArchDistillConfig
from archnet.distill.blockwise import BlockwiseConfig
from archnet.distill.finetune import FinetuneConfig
from archnet.errors import ArchnetError


@dataclass
class LatencyConfig:
    """How candidates and networks are timed (the target supplies backend, device, threads)."""

    warmup: int = 10
    repeats: int = 50
    batch_size: int | None = None  # None: the target's batch size
    rounds: int = 7  # interleaved rounds when teacher and student are timed in the same run


@dataclass
class ConvertConfig:
    model: str = "zoo:tiny_effnet"  # how the teacher was given: 'timm:NAME', 'zoo:NAME', 'pkg.mod:fn', 'python'
    checkpoint: str | None = None
    data: str = "digits"
    eval_data: str | None = (
        None  # labelled data for top-1 (default: the held-out split, if labelled)
    )
    input_size: tuple[int, ...] = (3, 32, 32)
    target: str = "cpu-ort"
    budget: str = "0.5"  # latency: a fraction of the teacher's ('0.5') or absolute ('2.5ms')
    params_budget: str | None = None  # a fraction of the teacher's ('0.8') or absolute ('1.2M')
    macs_budget: str | None = None  # likewise ('0.5', '150M')
    blocks: str | None = None  # comma-separated block patterns; None: detect
    candidates: str = "*"  # comma-separated candidate name patterns
    # drop candidates costlier than this x the teacher block's MACs; None: 1.5 in hant mode and
    # off in archnet mode (dense 3x3 stand-ins for depthwise blocks cost more MACs by nature); 0: off
    max_macs_ratio: float | None = None
    # "hant": end-to-end KD fine-tune; "archnet": convert stem/head to the target's operators
    # and train with Arch-Distillation; "auto": archnet when the target restricts operators
    mode: str = "auto"
    ablation: bool = False  # archnet mode: also train without TA / RFA / progressive schedule
    # quantization: None keeps the student float; 'w4a4' trains every layer at 4-bit weights
    # and activations; 'auto' offers each candidate at every width in bit_choices to the ILP
    bits: str | None = None
    first_last: str = "w8a8"  # bits of the first and last layer; 'same': like the others
    bit_choices: str = "w8a8,w4a4,w2a4"  # the widths 'auto' chooses among
    # model size: a fraction of the teacher's FP32 size ('0.15') or absolute ('1.5MB', '200kB')
    size_budget: str | None = None
    heldout_fraction: float = 0.2  # unlabeled data kept out of training for scores and checks
    max_samples: int | None = None  # cap on the unlabeled training images (None: all)
    seed: int = 0
    blockwise: BlockwiseConfig = field(default_factory=BlockwiseConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    arch: ArchDistillConfig = field(default_factory=ArchDistillConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def validate(self) -> None:
        """Fail on any bad option before hours of work, not at the stage that first reads it."""
        from archnet.candidates import list_candidates
        from archnet.targets import load_target

        load_target(self.target)
        parse_budget(self.budget, "latency")
        for what, text in (("params", self.params_budget), ("macs", self.macs_budget)):
            if text is not None:
                parse_budget(text, what)
        patterns = [p.strip() for p in self.candidates.split(",") if p.strip() != "teacher"]
        if patterns:
            list_candidates(patterns)
        self._validate_bits()
        if self.mode not in ("auto", "hant", "archnet"):
            raise ArchnetError(f"mode {self.mode!r} is not one of auto, hant, archnet")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ArchnetError(f"heldout_fraction {self.heldout_fraction} must be in (0, 1)")

    def _validate_bits(self) -> None:
        from archnet.quant import parse_bits
        from archnet.targets import load_target

        def check(text: str, what: str) -> None:
            try:
                parse_bits(text)
            except ValueError as e:
                raise ArchnetError(f"{what}: {e}") from None

        if self.bits is not None and self.bits != "auto":
            check(self.bits, "--bits")
        if self.bits == "auto":
            for text in self.bit_choices.split(","):
                check(text, "bit_choices")
        if self.first_last != "same":
            check(self.first_last, "--first-last")
        if self.size_budget is not None:
            parse_budget(self.size_budget, "size")
        rules = load_target(self.target).rules
        if rules.quantized_only and not self.bits:
            raise ArchnetError(
                f"target {self.target} runs only integer compute; pass --bits (e.g. w8a8 or w4a4)"
            )
        if self.bits and rules.max_channels:
            raise ArchnetError(
                f"target {self.target} caps channels (max_channels), which quantized students "
                "do not support yet; drop --bits or use a target without max_channels"
            )

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(tomli_w.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ConvertConfig:
        return _build(cls, data, source)

    @classmethod
    def load(cls, path: str | Path) -> ConvertConfig:
        path = Path(path)
        if not path.is_file():
            raise ArchnetError(f"config {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ArchnetError(f"config {path} is not valid TOML: {e}") from None
        return cls.from_dict(data, str(path))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: unset options are simply absent."""
    return {
        k: _drop_none(v) if isinstance(v, dict) else (list(v) if isinstance(v, tuple) else v)
        for k, v in d.items()
        if v is not None
    }


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ArchnetError(
                f"{source}: unknown key {prefix + key!r}; known: {', '.join(sorted(fields))}"
            )
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ArchnetError(f"{source}: {prefix}{key} must be a table")
            value = _build(type(default), value, source, f"{prefix}{key}.")
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    """A budget either relative to the teacher (fraction) or absolute (in the cost's unit)."""

    value: float
    relative: bool

    def resolve(self, teacher_value: float) -> float:
        return self.value * teacher_value if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}x teacher" if self.relative else f"{self.value:g}"


_BYTES = {"b": 8, "kb": 8e3, "mb": 8e6, "gb": 8e9}  # to bits
_ABSOLUTE_HINT = {
    "latency": "or milliseconds ('2.5ms')",
    "size": "or bytes ('1.5MB', '200kB')",
}


def parse_budget(text: str | float, what: str = "latency") -> Budget:
    """'0.5' or '0.5x' -> half the teacher's; '2.5ms' -> 2.5 ms; '1.2M' -> 1.2e6 (params/MACs);
    '1.5MB' -> 1.2e7 bits (size)."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(x|ms|kb|mb|gb|b|k|m|g)?", s)
    if not m or float(m.group(1)) <= 0:
        raise ArchnetError(
            f"{what} budget {text!r} is not understood; give a fraction of the teacher ('0.5') "
            + _ABSOLUTE_HINT.get(what, "or a count ('1.5M')")
        )
    value, unit = float(m.group(1)), m.group(2) or ""
    if what == "size":
        if unit in ("", "x"):
            return Budget(value, relative=True)
        if unit in _BYTES:
            return Budget(value * _BYTES[unit], relative=False)
    elif what == "latency":
        if unit in ("", "x"):
            return Budget(value, relative=True)
        if unit == "ms":
            return Budget(value, relative=False)
    elif unit in ("", "x") and value <= 1.0 or unit == "x":
        return Budget(value, relative=True)
    elif unit in _SUFFIX:
        return Budget(value * _SUFFIX[unit], relative=False)
    raise ArchnetError(f"{what} budget {text!r}: unit {unit!r} does not apply to {what}")
