"""Hardware targets: which operators a chip accepts and how latency is measured on it.

A target is a small TOML profile so that a new chip is described by data, not code. Profiles
are validated strictly: a typo in a key would otherwise silently fall back to a default and
produce a search tuned for the wrong hardware.

Besides the operator whitelist, a ``[rules]`` table restricts operator attributes, because
NPUs that accept ``Conv`` often accept only some kernels, strides or group counts (Arch-Net:
3x3 dense convolutions and 2x2 max-pooling). ``quantized_only`` marks integer-only chips: every
convolution and matrix product must read dequantized integers (a QDQ graph).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import onnx

from archnet.errors import ArchnetError
from archnet.targets import cost_model, ov_backend  # noqa: F401 (register their backends)
from archnet.targets.latency import BACKENDS, LatencyBackend, get_backend

__all__ = ["BUILTIN", "CONV_GROUPS", "DEVICES", "Rules", "Target", "list_targets", "load_target"]

BUILTIN = "built-in"
DEVICES = ("cpu", "cuda")
ALL_OPS = "*"
# "dense": group must be 1; "depthwise": 1 or one group per input channel; "any": unchecked
CONV_GROUPS = ("dense", "depthwise", "any")

Pairs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Rules:
    """Attribute rules of a target; None (False for ``quantized_only``) means not enforced.

    Tuples rather than lists so that targets stay hashable and compare equal after a round
    trip through TOML. ``quantized_only`` stands for integer-only NPUs: the data and weight
    inputs of every Conv, ConvTranspose, Gemm and MatMul must come straight from a
    ``DequantizeLinear`` over integers, so only quantized (QDQ) exports pass.
    """

    conv_kernel_shapes: Pairs | None = None
    conv_strides: Pairs | None = None
    conv_dilations: Pairs | None = None
    conv_groups: str | None = None
    pool_kernel_shapes: Pairs | None = None
    pool_strides: Pairs | None = None
    max_channels: int | None = None
    quantized_only: bool = False
    softmax_last_axis: bool = False  # Softmax only over the innermost axis (attention rows)
    matmul_max_rank: int | None = None  # batched MatMul: at most this many axes per operand

    def __bool__(self) -> bool:
        """True when any rule is set, so callers can skip attribute checks on open targets."""
        return bool(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The rules that are set (differ from their default), TOML-shaped (lists, not tuples)."""
        return {
            f.name: _RULES[f.name].unconvert(value)
            for f in fields(self)
            if (value := getattr(self, f.name)) != f.default
        }


@dataclass(frozen=True)
class Target:
    """One deployment target: operator whitelist plus the latency backend that times blocks."""

    name: str
    description: str
    backend: str
    device: str
    threads: int
    batch_size: int = 1
    allowed_ops: frozenset[str] | None = None
    rules: Rules = field(default_factory=Rules)
    cost: tuple[tuple[str, float], ...] = ()  # a cost model's [cost] settings, sorted
    # where a quantized student is quantized: "integer" (each tensor once where an integer
    # chip requantizes it, archnet.quant.integer) or "inputs" (layer inputs alone), whichever
    # the runtime turns into faster kernels
    quant_points: str = "integer"
    source: str = BUILTIN

    @property
    def requantize(self) -> bool:
        return self.quant_points == "integer"

    @property
    def estimated(self) -> bool:
        """Whether its latency figures are a cost model's estimates, not measurements."""
        return BACKENDS[self.backend].estimated

    def allows(self, op_type: str) -> bool:
        """Whether an ONNX op type may appear in a student for this target."""
        return self.allowed_ops is None or op_type in self.allowed_ops

    def latency_backend(self) -> LatencyBackend:
        """The configured backend; fails here (not at load time) when the device is missing."""
        return get_backend(
            self.backend, device=self.device, threads=self.threads, **dict(self.cost)
        )

    def to_dict(self) -> dict[str, Any]:
        """TOML-shaped data: written into a run's config and loadable again as a profile."""
        allowed: str | list[str] = ALL_OPS if self.allowed_ops is None else sorted(self.allowed_ops)
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "latency": {
                "backend": self.backend,
                "device": self.device,
                "threads": self.threads,
                "batch_size": self.batch_size,
            },
            "ops": {"allowed": allowed},
        }
        if self.rules:
            data["rules"] = self.rules.to_dict()
        if self.cost:
            data["cost"] = dict(self.cost)
        if not self.requantize:
            data["quant"] = {"points": self.quant_points}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = BUILTIN) -> Target:
        """Validate profile data; errors name the offending key and the file it came from."""
        _check_unknown_keys(data, source)
        values = {f.attr: _read(data, f, source) for f in _FIELDS}
        return cls(**values, source=source)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_table(value: object) -> bool:
    return isinstance(value, dict)


def _is_device(value: object) -> bool:
    return value in DEVICES


def _is_backend(value: object) -> bool:
    return value in BACKENDS


def _is_pair_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(_is_positive_int(v) for v in pair)
        for pair in value
    )


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_conv_groups(value: object) -> bool:
    return value in CONV_GROUPS


def _is_op_list(value: object) -> bool:
    return value == ALL_OPS or (
        isinstance(value, list) and all(isinstance(op, str) and op for op in value)
    )


COST_KEYS = ("bops_per_ms", "bits_per_ms")


def _is_cost(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()
    )


def _to_cost(value: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, float(v)) for k, v in value.items()))


def _check_cost(value: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(value) - set(COST_KEYS))
    if unknown:
        raise _fail(source, f"unknown key cost.{unknown[0]} (known: {', '.join(COST_KEYS)})")


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Kind:
    """How one kind of value is checked, described in errors, and turned into a field.

    ``inner`` checks what ``check`` cannot describe in one phrase (unknown op names, rule keys)
    and raises with the offending sub-key; ``unconvert`` turns the field back into TOML data.
    """

    check: Callable[[object], bool]
    describe: Callable[[], str]
    convert: Callable[[Any], Any] = _same
    inner: Callable[[Any, str], None] | None = None
    unconvert: Callable[[Any], Any] = _same


def _to_ops(value: str | list[str]) -> frozenset[str] | None:
    return None if value == ALL_OPS else frozenset(value)


def _to_pairs(value: list[list[int]]) -> Pairs:
    return tuple((int(a), int(b)) for a, b in value)


def _from_pairs(value: Pairs) -> list[list[int]]:
    return [list(pair) for pair in value]


def _to_rules(value: dict[str, Any]) -> Rules:
    return Rules(**{key: _RULES[key].convert(item) for key, item in value.items()})


def _check_op_names(value: str | list[str], source: str) -> None:
    """Catch PyTorch class names (``Conv2d``) where ONNX op types (``Conv``) are expected."""
    if value == ALL_OPS:
        return
    unknown = [op for op in value if not onnx.defs.has(op)]
    if unknown:
        raise _fail(source, f"ops.allowed has unknown ONNX op types: {', '.join(unknown)}")


def _check_rules(value: dict[str, Any], source: str) -> None:
    """Each rule key must be known and hold the right kind of value."""
    for key, item in value.items():
        kind = _RULES.get(key)
        if kind is None:
            raise _fail(source, f"unknown key rules.{key} (known: {', '.join(sorted(_RULES))})")
        if not kind.check(item):
            raise _fail(source, f"rules.{key} must be {kind.describe()} (got {item!r})")


_PAIRS = _Kind(
    _is_pair_list,
    lambda: "a list of [h, w] pairs of positive integers",
    _to_pairs,
    unconvert=_from_pairs,
)

# The [rules] table: key -> kind; Rules has one field per key.
_RULES: dict[str, _Kind] = {
    "conv_kernel_shapes": _PAIRS,
    "conv_strides": _PAIRS,
    "conv_dilations": _PAIRS,
    "conv_groups": _Kind(_is_conv_groups, lambda: f"one of {', '.join(CONV_GROUPS)}"),
    "pool_kernel_shapes": _PAIRS,
    "pool_strides": _PAIRS,
    "max_channels": _Kind(_is_positive_int, lambda: "a positive integer"),
    "quantized_only": _Kind(_is_bool, lambda: "true or false"),
    "softmax_last_axis": _Kind(_is_bool, lambda: "true or false"),
    "matmul_max_rank": _Kind(_is_positive_int, lambda: "a positive integer"),
}


_KINDS: dict[str, _Kind] = {
    "text": _Kind(_is_str, lambda: "a string"),
    "name": _Kind(_is_name, lambda: "a non-empty string"),
    "count": _Kind(_is_positive_int, lambda: "a positive integer"),
    "device": _Kind(_is_device, lambda: f"one of {', '.join(DEVICES)}"),
    "backend": _Kind(_is_backend, lambda: f"a known backend ({', '.join(sorted(BACKENDS))})"),
    "ops": _Kind(
        _is_op_list, lambda: f'"{ALL_OPS}" or a list of ONNX op types', _to_ops, _check_op_names
    ),
    "rules": _Kind(_is_table, lambda: "a table", _to_rules, _check_rules),
    "cost": _Kind(_is_cost, lambda: "a table of positive numbers", _to_cost, _check_cost),
    "points": _Kind(lambda v: v in QUANT_POINTS, lambda: f"one of {', '.join(QUANT_POINTS)}"),
}

_REQUIRED = object()
QUANT_POINTS = ("integer", "inputs")


@dataclass(frozen=True)
class _Field:
    key: str  # dotted TOML key
    attr: str  # Target attribute
    kind: str  # key into _KINDS
    default: Any = _REQUIRED


_FIELDS = (
    _Field("name", "name", "name"),
    _Field("description", "description", "text", ""),
    _Field("latency.backend", "backend", "backend"),
    _Field("latency.device", "device", "device", "cpu"),
    _Field("latency.threads", "threads", "count", 1),
    _Field("latency.batch_size", "batch_size", "count", 1),
    _Field("ops.allowed", "allowed_ops", "ops", ALL_OPS),
    _Field("rules", "rules", "rules", {}),
    _Field("cost", "cost", "cost", {}),
    _Field("quant.points", "quant_points", "points", "integer"),
)

# Keys accepted but not turned into fields ("source" is written by to_dict for provenance).
_IGNORED_KEYS = frozenset({"source"})
_SECTIONS = frozenset(f.key.split(".")[0] for f in _FIELDS if "." in f.key)


def _fail(source: str, message: str) -> ArchnetError:
    where = "built-in target" if source == BUILTIN else f"target file {source}"
    return ArchnetError(f"{where}: {message}")


def _check_unknown_keys(data: Mapping[str, Any], source: str) -> None:
    """Reject typos such as ``thread = 4`` instead of silently using a default."""
    known = {f.key for f in _FIELDS} | _IGNORED_KEYS
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise _fail(source, f"[{key}] must be a table")
            for sub in value:
                if f"{key}.{sub}" not in known:
                    raise _fail(source, f"unknown key {key}.{sub}")
        elif key not in known:
            raise _fail(source, f"unknown key {key}")


def _read(data: Mapping[str, Any], spec: _Field, source: str) -> Any:
    node: Any = data
    for part in spec.key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if spec.default is _REQUIRED:
                raise _fail(source, f"missing required key {spec.key}")
            return _KINDS[spec.kind].convert(spec.default)
        node = node[part]
    kind = _KINDS[spec.kind]
    if not kind.check(node):
        raise _fail(source, f"{spec.key} must be {kind.describe()} (got {node!r})")
    if kind.inner is not None:
        kind.inner(node, source)
    return kind.convert(node)


def _profiles() -> dict[str, Any]:
    """Built-in profile files by target name (file stem)."""
    folder = resources.files("archnet.targets") / "profiles"
    return {
        entry.name.removesuffix(".toml"): entry
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    }


def _parse(text: str, source: str) -> Target:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"TOML syntax error: {exc}") from exc
    return Target.from_dict(data, source)


def _looks_like_path(name: str) -> bool:
    return name.endswith(".toml") or "/" in name or "\\" in name or Path(name).is_file()


def load_target(name_or_path: str | Path | Target) -> Target:
    """A built-in target by name, or a user profile from a ``.toml`` path."""
    if isinstance(name_or_path, Target):
        return name_or_path
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ArchnetError(f"target file not found: {path}")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ArchnetError(f"cannot read target file {path}: {exc}") from exc
        return _parse(content, str(path))
    profiles = _profiles()
    if text not in profiles:
        raise ArchnetError(
            f"unknown target {text!r}; built-in targets: {', '.join(sorted(profiles))} "
            "(or give a path to a .toml profile)"
        )
    return _parse(profiles[text].read_text(encoding="utf-8"), BUILTIN)


def list_targets() -> list[Target]:
    """All built-in targets, sorted by name, whether or not this machine can run them."""
    return [load_target(name) for name in sorted(_profiles())]
