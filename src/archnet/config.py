"""A conversion's settings as small dataclasses; TOML in, the resolved TOML written to the run."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tomllib
import types
import typing
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
    # a latency cache (SQLite) shared with other runs; None: the run's own latency.sqlite.
    # Runs that share one measure each module once and get identical tables.
    cache: str | None = None


@dataclass
class ConvertConfig:
    model: str = "zoo:tiny_effnet"  # how the teacher was given: 'timm:NAME', 'zoo:NAME', 'pkg.mod:fn', 'python'
    # what the model's inputs and outputs are (archnet.tasks); "auto": read from the teacher's
    # outputs when the run is created, and stored as the task it chose
    task: str = "auto"
    checkpoint: str | None = None
    data: str = "digits"
    eval_data: str | None = (
        None  # labelled data for top-1 (default: the held-out split, if labelled)
    )
    input_size: tuple[int, ...] | None = None  # C,H,W; None: the model's, else the data's
    target: str = "cpu-ort"
    budget: str = "0.5"  # latency: a fraction of the teacher's ('0.5') or absolute ('2.5ms')
    # share of the latency budget the search leaves unused: the same student measured again
    # varies by a few percent, and a budget met only on the prediction is not met
    budget_margin: float = 0.03
    # measured / predicted student-to-teacher latency ratio, dividing the latency budget the
    # search enforces; set by the run itself when its measured student missed the budget by
    # more than 10% and budget_correction is on (archnet.api.finish), else 1.0
    latency_correction: float = 1.0
    budget_correction: bool = True
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
    # three disjoint splits of the data: train (distillation), selection (scores, the search,
    # every choice) and evaluation (reported figures only); evaluation is carved out only when
    # neither eval_data nor the data set's own test split is there
    selection_fraction: float = 0.15
    eval_fraction: float = 0.15
    max_selection: int | None = 2000  # cap on selection images (scores cost a forward each)
    max_samples: int | None = None  # cap on the unlabeled training images (None: all)
    seed: int = 0
    ablation_seeds: int = 3  # archnet mode: seeds of every ablation variant (mean and std)
    # labelled evaluation images each choice's swapped teacher is scored on, to measure how
    # well the proxies rank candidates (a forward per choice each; 0: not measured)
    proxy_images: int = 1000
    # the ILP's summed replace-one-block scores ignore how blocks interact and how well a
    # student recovers in the end-to-end stage; with rerank = K > 1 the K best students it
    # finds (each differing from every better one in half the blocks or more) are assembled,
    # fine-tuned for one pass over rerank_samples training images, and the lowest selection
    # KL wins (0 or 1: the ILP's best)
    rerank: int = 0
    rerank_samples: int = 4000
    # where the work runs (never what it produces): training and scoring device ('auto': CUDA
    # when present), and the executor of candidate and scoring jobs ('auto': 'process' when
    # blockwise.workers > 1, else 'inprocess'; 'ray' on the cluster at ray_address, each job
    # asking for gpus_per_job GPUs)
    # modules imported before converting (comma-separated): converters, rewrites, candidates
    # they register are used like the built-in ones (archnet.plugins)
    plugins: str | None = None
    device: str = "auto"
    executor: str = "auto"
    ray_address: str | None = None
    gpus_per_job: float = 0.0
    blockwise: BlockwiseConfig = field(default_factory=BlockwiseConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    arch: ArchDistillConfig = field(default_factory=ArchDistillConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def validate(self) -> None:
        """Fail on any bad option before hours of work, not at the stage that first reads it."""
        from archnet.candidates import list_candidates
        from archnet.targets import load_target
        from archnet.tasks import get_task

        check_types(self)
        from archnet.plugins import load_plugins

        load_plugins(self.plugins)  # before anything they register is looked up
        if self.task == "translation":
            raise ArchnetError(
                "translation models convert with `archnet convert --task translation --model "
                "hf:DIR` (archnet.seq2seq), not through the image pipeline"
            )
        if self.task != "auto":
            get_task(self.task)
        load_target(self.target)
        parse_budget(self.budget, "latency")
        for what, text in (("params", self.params_budget), ("macs", self.macs_budget)):
            if text is not None:
                parse_budget(text, what)
        patterns = [p.strip() for p in self.candidates.split(",") if p.strip() != "teacher"]
        if patterns:
            list_candidates(patterns)
        self._validate_bits()
        if self.executor != "auto":
            from archnet.executors import EXECUTORS

            if self.executor not in EXECUTORS:
                raise ArchnetError(
                    f"executor {self.executor!r} is not one of auto, {', '.join(EXECUTORS)}"
                )
        from archnet.device import resolve_device

        resolve_device(self.device)
        if self.mode not in ("auto", "hant", "archnet"):
            raise ArchnetError(f"mode {self.mode!r} is not one of auto, hant, archnet")
        for name in ("selection_fraction", "eval_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ArchnetError(f"{name} {value} must be in (0, 0.5)")
        if not self.latency_correction > 0:
            raise ArchnetError(f"latency_correction {self.latency_correction} must be positive")
        if not 0.0 <= self.budget_margin < 0.5:
            raise ArchnetError(f"budget_margin {self.budget_margin} must be in [0, 0.5)")
        if self.ablation_seeds < 1:
            raise ArchnetError(f"ablation_seeds {self.ablation_seeds} must be at least 1")
        if self.rerank < 0 or self.rerank_samples < 1:
            raise ArchnetError(
                f"rerank {self.rerank} must be 0 or more and rerank_samples "
                f"{self.rerank_samples} at least 1"
            )

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
        return cls.from_dict(read_toml(path), str(path))


def merge_settings(stored: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with every setting ``given`` names replaced, table by table: a resumed run's
    ``--config`` file changes what it says and keeps the rest."""
    out = dict(stored)
    for key, value in given.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_settings(out[key], value) if both else value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's settings; one line naming the file when it is missing or not TOML."""
    path = Path(path)
    if not path.is_file():
        raise ArchnetError(f"config {path} does not exist; give a TOML file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ArchnetError(f"config {path} is not valid TOML: {e}") from None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: unset options are simply absent."""
    return {
        k: _drop_none(v) if isinstance(v, dict) else (list(v) if isinstance(v, tuple) else v)
        for k, v in d.items()
        if v is not None
    }


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
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
        else:
            value = _typed(value, hints[key], f"{source}: {prefix}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def check_types(obj: Any, prefix: str = "") -> None:
    """Every field of a (nested) config dataclass holds a value of its declared type.

    Options set from Python (``convert(epochs="two")``) skip the TOML reader, so the same check
    runs again before any work starts; ints are accepted where floats are declared.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_types(value, f"{prefix}{f.name}.")
        else:
            setattr(obj, f.name, _typed(value, hints[f.name], f"option {prefix}{f.name}"))


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` as ``hint`` (int, float, str, bool, X | None, tuple[int, ...]), else an error."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            with contextlib.suppress(ArchnetError):
                return _typed(value, option, where)
        _type_error(value, " or ".join(_describe(o) for o in options), where)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            _type_error(value, _describe(hint), where)
        return tuple(_typed(v, args[0], where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in _TYPE_WORDS and not (
        isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    ):
        _type_error(value, _describe(hint), where)
    return value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _type_error(value: Any, expected: str, where: str) -> None:
    raise ArchnetError(f"{where} must be {expected}, not {value!r}")


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
