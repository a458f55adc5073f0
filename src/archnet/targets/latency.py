"""Latency measurement backends, structural signatures and a resumable SQLite cache.

Every candidate block is timed at its real input shape on the backend a target names. Timings
are medians (robust to scheduler hiccups) and are cached by structure and by everything that
changes what a call costs (runtime versions, exporter, CPU, GPU), so a block that appears in
many candidate networks, in a resumed run or in another run on the same machine is timed once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import functools
import hashlib
import inspect
import math
import platform
import sqlite3
import statistics
import sys
import time
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from archnet.errors import ArchnetError
from archnet.onnx_utils import (
    INPUT_NAME,
    export_chain,
    exporter_of,
    ort_session,
    sample_input,
    uniform_exporters,
)

__all__ = [
    "BACKENDS",
    "EAGER",
    "EXTERNAL",
    "CacheKey",
    "CachedTiming",
    "GroupTiming",
    "LatencyBackend",
    "LatencyCache",
    "OnnxRuntimeBackend",
    "Prepared",
    "Timings",
    "TorchBackend",
    "cpu_model",
    "get_backend",
    "measure_cached",
    "measure_cached_group",
    "module_signature",
    "OnnxBackend",
    "prepare_onnx",
    "register_backend",
]

Runner = Callable[[], object]
"""One synchronous inference call; returns only after the result is ready."""

Timeable = nn.Module | onnx.ModelProto
"""A module, or an ONNX model already exported (e.g. by another quantization tool)."""

EAGER = "eager"
"""Exporter tag of a module run as it is, without export (the torch backend)."""
EXTERNAL = "external"
"""Exporter tag of an ONNX model handed in already exported, without archnet's tag."""

BACKENDS: dict[str, type[LatencyBackend]] = {}


def register_backend(name: str) -> Callable[[type[LatencyBackend]], type[LatencyBackend]]:
    """Class decorator that makes a backend selectable by name from a target profile."""

    def decorate(cls: type[LatencyBackend]) -> type[LatencyBackend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return decorate


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _ort_cuda_available() -> bool:
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@dataclass(frozen=True)
class Prepared:
    """One item made ready to time: what its runner needs and the exporter that made it."""

    exporter: str
    payload: object
    fixed: bool = False  # an ONNX model handed in as it is: it cannot be re-exported


class Timings(dict[str, float]):
    """Median ms per item (a plain dict to callers) and the exporter each item was timed from.

    ``exporters`` maps every key to its exporter tag (``"torchscript/opset17"``, ``"eager"``);
    all items of one group share one tag apart from ONNX models handed in without a tag
    (``"external"``). ``reexported`` lists the keys whose first export used another exporter
    and that were re-exported so the group is timed from one.
    """

    def __init__(
        self,
        ms: Mapping[str, float],
        exporters: Mapping[str, str],
        reexported: Iterable[str] = (),
    ) -> None:
        super().__init__(ms)
        self.exporters = dict(exporters)
        self.reexported = tuple(reexported)

    @property
    def exporter(self) -> str:
        """The exporter the whole group was timed from."""
        tags = sorted(set(self.exporters.values()) - {EXTERNAL})
        return tags[0] if tags else EXTERNAL


@dataclass(frozen=True)
class CacheKey:
    """Everything besides the module and its shape that decides what one call costs."""

    backend: str
    runtime: str  # runtime and exporter versions, e.g. "onnxruntime 1.20; onnx 1.17; torch ..."
    device: str
    threads: int
    cpu: str
    gpu: str  # "" off CUDA

    @property
    def platform(self) -> str:
        """One line for reports: where and with what the numbers were measured."""
        return "; ".join(part for part in (self.cpu, self.gpu, self.runtime) if part)


class LatencyBackend(ABC):
    """Times modules at a fixed input shape on one runtime, device and thread count.

    Subclasses only say how to prepare one module (export it) and how to run it; warm-up,
    timing, round-robin interleaving, one exporter per group and the empty-graph overhead are
    shared so that backends are comparable.
    """

    name: ClassVar[str] = ""
    devices: ClassVar[Mapping[str, Callable[[], bool]]] = {"cpu": lambda: True}
    estimated: ClassVar[bool] = False  # True: figures come from a cost model, not a clock

    def __init__(self, device: str = "cpu", threads: int = 1) -> None:
        self.device = device
        self.threads = threads
        self._overheads: dict[tuple[int, ...], float] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, threads={self.threads})"

    @abstractmethod
    def runtime(self) -> str:
        """Versions of everything that turns a module into what runs (part of the cache key)."""

    @abstractmethod
    def _prepare(
        self, module: Timeable, input_shape: tuple[int, ...], exporter: str | None = None
    ) -> Prepared:
        """Export ``module`` (with ``exporter`` when given) or copy it for running.

        A fake-quantized module runs as the backend would deploy it: as a QDQ graph where the
        runtime has integer kernels, else as its float twin.
        """

    @abstractmethod
    def _runner(self, prepared: Prepared, input_shape: tuple[int, ...]) -> Runner:
        """A one-call runner (session, device copy) for a prepared item."""

    def _context(self) -> contextlib.AbstractContextManager[object]:
        """Process-wide settings held while timing (thread counts, inference mode)."""
        return contextlib.nullcontext()

    def cache_key(self) -> CacheKey:
        """This backend's part of a latency cache key, read now (versions may be patched)."""
        gpu = torch.cuda.get_device_name(0) if self.device == "cuda" else ""
        return CacheKey(self.name, self.runtime(), self.device, self.threads, cpu_model(), gpu)

    def _prepare_group(
        self, items: Mapping[str, tuple[Timeable, tuple[int, ...]]]
    ) -> tuple[dict[str, Prepared], list[str]]:
        """Prepare every item from one exporter; returns the items and the keys re-exported.

        Exporters emit different graphs (fused or not, other opsets), so a group whose members
        came from different ones would compare exporters, not modules. Members whose export
        fell back are the reason for the fallback, so the others follow them
        (``uniform_exporters``); an ONNX model handed in is never re-exported.
        """
        prepared = {key: self._prepare(m, shape) for key, (m, shape) in items.items()}
        tags = {p.exporter for p in prepared.values()} - {EXTERNAL}
        if len(tags) <= 1:
            return prepared, []
        failures: list[str] = []
        for tag in uniform_exporters(tags):
            redo = sorted(k for k, p in prepared.items() if p.exporter not in (tag, EXTERNAL))
            fixed = [k for k in redo if prepared[k].fixed]
            if fixed:
                failures.append(f"{tag}: {', '.join(fixed)} handed in exported otherwise")
                continue
            try:
                again = {k: self._prepare(*items[k], exporter=tag) for k in redo}
            except (RuntimeError, onnx.checker.ValidationError) as exc:
                failures.append(f"{tag}: {_first_line(exc)}")
                continue
            off = sorted(k for k, p in again.items() if p.exporter != tag)
            if off:
                failures.append(f"{tag}: {', '.join(off)} came out as another exporter")
                continue
            return {**prepared, **again}, redo
        raise ArchnetError(
            f"cannot time {', '.join(items)} from one ONNX exporter ({'; '.join(failures)}); "
            "time them in separate groups or make them exportable by one exporter"
        )

    def measure(
        self,
        module: Timeable,
        input_shape: Sequence[int],
        warmup: int = 10,
        repeats: int = 50,
    ) -> float:
        """Median milliseconds of one call at ``input_shape`` (with batch), after warm-up."""
        times = self.measure_interleaved({"module": (module, input_shape)}, 1, warmup, repeats)
        return times["module"]

    def measure_many(
        self,
        modules: Mapping[str, nn.Module],
        input_shape: Sequence[int],
        rounds: int = 5,
        warmup: int = 10,
        repeats: int = 50,
    ) -> Timings:
        """Median ms per module at one input shape, interleaved (see :meth:`measure_interleaved`)."""
        items = {key: (module, input_shape) for key, module in modules.items()}
        return self.measure_interleaved(items, rounds, warmup, repeats)

    def measure_interleaved(
        self,
        items: Mapping[str, tuple[Timeable, Sequence[int]]],
        rounds: int = 5,
        warmup: int = 10,
        repeats: int = 50,
    ) -> Timings:
        """Median ms per (module, input shape), interleaving them round-robin over ``rounds``.

        Networks being compared (teacher vs. student, a network vs. its parts) thus see the
        same thermal state and background load; a slow spell hits all of them instead of
        biasing one. ``repeats`` is the total number of samples per item, spread over rounds.
        All items are exported first and from one exporter; the result says which per item.
        """
        per_round = max(1, math.ceil(repeats / max(1, rounds)))
        shaped = {key: (m, tuple(int(s) for s in shape)) for key, (m, shape) in items.items()}
        with self._context():
            prepared, redone = self._prepare_group(shaped)
            runners = {key: self._runner(p, shaped[key][1]) for key, p in prepared.items()}
            for run in runners.values():
                for _ in range(warmup):
                    run()
            samples: dict[str, list[float]] = {key: [] for key in runners}
            for _ in range(max(1, rounds)):
                for key, run in runners.items():
                    samples[key].extend(_time_ms(run) for _ in range(per_round))
        medians = {key: statistics.median(values) for key, values in samples.items()}
        return Timings(medians, {key: p.exporter for key, p in prepared.items()}, redone)

    def overhead_ms(self, input_shape: Sequence[int], warmup: int = 10, repeats: int = 50) -> float:
        """Median ms of an empty (identity) graph at ``input_shape`` on this backend.

        Every call pays a fixed floor (session dispatch, input binding, Python and kernel
        launch cost) that does not grow with the work done. A network split into N blocks
        would pay it N times if block timings were simply summed, while the whole network pays
        it once; subtracting it from each block's time makes block latencies add up to the
        measured network latency. Memoized per shape for the lifetime of the backend.
        """
        shape = tuple(int(s) for s in input_shape)
        if shape not in self._overheads:
            self._overheads[shape] = self.measure(nn.Identity(), shape, warmup, repeats)
        return self._overheads[shape]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _time_ms(run: Runner) -> float:
    start = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - start) / 1e6


def prepare_onnx(
    module: Timeable, input_shape: tuple[int, ...], exporter: str | None = None
) -> Prepared:
    """``module`` as ONNX bytes (QDQ when fake-quantized) and a sample input: what an ONNX
    runtime loads. An ONNX model handed in is kept as it is."""
    if isinstance(module, onnx.ModelProto):
        x = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)
        tag = exporter_of(module) or EXTERNAL
        return Prepared(tag, (module.SerializeToString(), x), fixed=True)
    from archnet.quant.export import export_any

    model = export_any(module, input_shape, exporter=exporter)
    x = sample_input(module, input_shape).cpu().numpy()
    return Prepared(exporter_of(model) or EXTERNAL, (model.SerializeToString(), x))


class OnnxBackend(LatencyBackend):
    """A backend that runs a module's ONNX export (QDQ when fake-quantized); a subclass names
    its runtime and runs the bytes."""

    @abstractmethod
    def runtime_version(self) -> str:
        """The runtime and its version (part of the cache key)."""

    def runtime(self) -> str:
        chain = ">".join(export_chain())
        return (
            f"{self.runtime_version()}; onnx {onnx.__version__}; "
            f"exported by torch {torch.__version__} via {chain}"
        )

    def _prepare(
        self, module: Timeable, input_shape: tuple[int, ...], exporter: str | None = None
    ) -> Prepared:
        return prepare_onnx(module, input_shape, exporter)


@register_backend("onnxruntime")
class OnnxRuntimeBackend(OnnxBackend):
    """onnxruntime with all graph optimizations, i.e. what an ONNX deployment would run."""

    devices: ClassVar[Mapping[str, Callable[[], bool]]] = {
        "cpu": lambda: True,
        "cuda": _ort_cuda_available,
    }

    def runtime_version(self) -> str:
        return f"onnxruntime {ort.__version__}"

    def _runner(self, prepared: Prepared, input_shape: tuple[int, ...]) -> Runner:
        model, x = prepared.payload
        session = ort_session(model, threads=self.threads, device=self.device)
        if self.device == "cuda":
            return _iobinding_runner(session, x)
        feed = {INPUT_NAME: x}
        return lambda: session.run(None, feed)


def _iobinding_runner(session: ort.InferenceSession, x: np.ndarray) -> Runner:
    """Keep input and outputs on the GPU so host-device copies are not timed as compute."""
    binding = session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


@register_backend("torch")
class TorchBackend(LatencyBackend):
    """PyTorch eager mode: the reference for what training-time code actually costs."""

    devices: ClassVar[Mapping[str, Callable[[], bool]]] = {
        "cpu": lambda: True,
        "cuda": _cuda_available,
    }

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        previous = torch.get_num_threads()
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.set_num_threads(previous)

    def runtime(self) -> str:
        text = f"torch {torch.__version__}"
        if self.device == "cuda":
            text += f"; cuda {torch.version.cuda}; cudnn {torch.backends.cudnn.version()}"
        return text

    def _prepare(
        self, module: Timeable, input_shape: tuple[int, ...], exporter: str | None = None
    ) -> Prepared:
        if isinstance(module, onnx.ModelProto):
            raise ArchnetError("the torch latency backend times modules, not ONNX models")
        from archnet.quant.api import strip_quantizers

        # A private copy: eval mode and device placement must not leak into the caller's
        # module (it may be mid-training), and runners outlive this call in measure_many.
        # Eager PyTorch has no integer kernels: a quantized module runs as its float twin.
        work = strip_quantizers(copy.deepcopy(module)).to(torch.device(self.device)).eval()
        return Prepared(EAGER, work)

    def _runner(self, prepared: Prepared, input_shape: tuple[int, ...]) -> Runner:
        work = prepared.payload
        device = torch.device(self.device)
        x = sample_input(work, input_shape, device=self.device)
        if device.type == "cuda":

            def run() -> None:
                work(x)
                torch.cuda.synchronize(device)

            return run
        return lambda: work(x)


def get_backend(
    name: str, device: str = "cpu", threads: int = 1, **options: float
) -> LatencyBackend:
    """Backend instance by registry name; refuses devices this machine cannot provide.
    ``options``: a cost model's settings (a target's ``[cost]`` table)."""
    if name not in BACKENDS:
        raise ArchnetError(
            f"unknown latency backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}"
        )
    cls = BACKENDS[name]
    if device not in cls.devices:
        raise ArchnetError(
            f"latency backend {name!r} does not support device {device!r}; "
            f"supported: {', '.join(cls.devices)}"
        )
    if not cls.devices[device]():
        available = [d for d, check in cls.devices.items() if check()]
        raise ArchnetError(
            f"device {device!r} is not available for latency backend {name!r} on this machine; "
            f"available: {', '.join(available)}"
        )
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ArchnetError(f"latency threads must be a positive integer, got {threads!r}")
    if options and not cls.estimated:
        raise ArchnetError(
            f"latency backend {name!r} measures; [cost] settings ({', '.join(options)}) apply "
            "to a cost model (backend 'bitops')"
        )
    return cls(device=device, threads=threads, **options)


def module_signature(module: nn.Module) -> str:
    """SHA-256 of what decides a module's cost, blind to its floating weight values.

    Hashed for every submodule: its qualified name and class, the source of its ``forward``
    (its bytecode where there is no source), its ``extra_repr`` and plain hyper-parameter
    attributes, the name, shape and dtype of every parameter and buffer, and the values of
    non-floating tensors: an integer or bool buffer can switch code paths or storage types (a
    quantizer's sign flag picks int8 or uint8). Floating values are left out on purpose: two
    copies of one structure with different trained weights cost the same, and a run must be
    able to reuse another run's measured table for candidates whose random initialisation
    differs. Training counters (BatchNorm's ``num_batches_tracked``) are hashed by shape only.
    """
    h = hashlib.sha256()
    for name, sub in module.named_modules():
        cls = type(sub)
        h.update(f"\nmodule {name} {cls.__module__}.{cls.__qualname__}\n".encode())
        h.update(_forward_text(sub).encode())
        h.update(f"\nextra {sub.extra_repr()}\nattrs {_hyper_parameters(sub)}".encode())
    for kind, tensors in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in tensors:
            h.update(f"\n{kind} {name} {tuple(tensor.shape)} {tensor.dtype}".encode())
            if _hash_values(name, tensor):
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_COUNTERS = frozenset({"num_batches_tracked"})
"""Integer buffers that count training steps: they differ between copies but cost nothing."""


def _hash_values(name: str, tensor: torch.Tensor) -> bool:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.is_quantized:
        return False
    return name.rsplit(".", 1)[-1] not in _COUNTERS


def _forward_text(module: nn.Module) -> str:
    forward = module.forward
    return _code_text(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=4096)
def _code_text(fn: Callable[..., object]) -> str:
    """Source of ``fn``; its bytecode and constants where the source is not available."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if code is None:
            return f"<{_qualified(fn)}>"
        return _bytecode_text(code)


def _bytecode_text(code: types.CodeType) -> str:
    consts = [
        _bytecode_text(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts
    ]
    return f"{code.co_code.hex()} {consts} {code.co_names}"


def _qualified(obj: object) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _plain(value: object) -> str:
    """A stable text for one attribute value: literals by value, everything else by type."""
    if value is None or isinstance(value, bool | int | float | str | torch.dtype | torch.device):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, tuple | list | frozenset | set):
        items = (
            sorted(map(_plain, value)) if isinstance(value, frozenset | set) else map(_plain, value)
        )
        return "(" + ", ".join(items) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_plain(k)}: {_plain(v)}" for k, v in value.items()) + "}"
    if callable(value) and hasattr(value, "__qualname__"):
        return _qualified(value)
    return f"<{_qualified(type(value))}>"  # never repr(): it may hold an object's address


def _hyper_parameters(module: nn.Module) -> str:
    """Public plain attributes (``stride``, ``bits``, ``enabled``...) but not the train flag."""
    attrs = sorted(
        (k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"
    )
    return ", ".join(f"{k}={_plain(v)}" for k, v in attrs)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name; ``platform.processor()`` is often empty on Linux."""
    if sys.platform.startswith("linux"):
        name = _cpuinfo_model(cpuinfo)
        if name:
            return name
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=8)
def _cpuinfo_model(cpuinfo: Path) -> str | None:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def _shape_text(input_shape: Sequence[int]) -> tuple[str, int]:
    """Split a batched shape into the per-sample shape text and the batch size."""
    shape = [int(s) for s in input_shape]
    if not shape:
        raise ValueError("input_shape must include the batch dimension")
    return "x".join(str(s) for s in shape[1:]), shape[0]


@dataclass(frozen=True)
class CachedTiming:
    """One cache row's value.

    ``ms`` is the time above ``floor_ms``, the per-call floor of the group it was timed in
    (0.0 when nothing was subtracted), so ``ms + floor_ms`` is the time as measured.
    """

    ms: float
    floor_ms: float
    exporter: str

    @property
    def measured_ms(self) -> float:
        return self.ms + self.floor_ms


_TABLE = "latency_v2"
_KEY_COLUMNS = tuple(f.name for f in dataclasses.fields(CacheKey)) + ("signature", "shape", "batch")
_VALUE_COLUMNS = ("ms", "floor_ms", "exporter", "created")
# Version 1 (table "latency") keyed rows by a weaker signature and without runtime versions,
# exporter or CPU; its rows can never match a version-2 key, so they are left alone unread.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    backend   TEXT    NOT NULL,
    runtime   TEXT    NOT NULL,
    device    TEXT    NOT NULL,
    threads   INTEGER NOT NULL,
    cpu       TEXT    NOT NULL,
    gpu       TEXT    NOT NULL,
    signature TEXT    NOT NULL,
    shape     TEXT    NOT NULL,
    batch     INTEGER NOT NULL,
    ms        REAL    NOT NULL,
    floor_ms  REAL    NOT NULL,
    exporter  TEXT    NOT NULL,
    created   REAL    NOT NULL,
    PRIMARY KEY ({", ".join(_KEY_COLUMNS)})
)
"""


class LatencyCache:
    """SQLite table of measured latencies; every ``put`` is committed so a killed run resumes.

    The key holds everything that changes a measurement (backend, runtime and exporter
    versions, device, threads, CPU and GPU model, module signature, shape), so one file can
    be shared between runs and machines without handing out another setup's numbers.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(path), timeout=30.0)
            self._conn.execute(_SCHEMA)
            self._conn.commit()
            columns = [row[1] for row in self._conn.execute(f"PRAGMA table_info({_TABLE})")]
        except sqlite3.DatabaseError as exc:
            raise ArchnetError(
                f"latency cache {path} is not a usable SQLite file ({exc}); delete it and "
                "the next run measures afresh"
            ) from None
        if tuple(columns) != _KEY_COLUMNS + _VALUE_COLUMNS:
            self._conn.close()
            raise ArchnetError(
                f"latency cache {path} has an unknown {_TABLE} table layout; delete it and "
                "the next run measures afresh"
            )

    def _key(self, key: CacheKey, signature: str, input_shape: Sequence[int]) -> tuple:
        return (*dataclasses.astuple(key), signature, *_shape_text(input_shape))

    def get(self, key: CacheKey, signature: str, input_shape: Sequence[int]) -> CachedTiming | None:
        """The cached timing for this key, or None if it was never measured."""
        where = " AND ".join(f"{c}=?" for c in _KEY_COLUMNS)
        row = self._conn.execute(
            f"SELECT ms, floor_ms, exporter FROM {_TABLE} WHERE {where}",
            self._key(key, signature, input_shape),
        ).fetchone()
        return None if row is None else CachedTiming(float(row[0]), float(row[1]), str(row[2]))

    def put(
        self, key: CacheKey, signature: str, input_shape: Sequence[int], timing: CachedTiming
    ) -> None:
        """Store (or overwrite) one measurement and commit immediately."""
        values = (float(timing.ms), float(timing.floor_ms), timing.exporter, time.time())
        marks = ", ".join("?" * (len(_KEY_COLUMNS) + len(_VALUE_COLUMNS)))
        self._conn.execute(
            f"INSERT OR REPLACE INTO {_TABLE} VALUES ({marks})",
            (*self._key(key, signature, input_shape), *values),
        )
        self._conn.commit()

    def __len__(self) -> int:
        return int(self._conn.execute(f"SELECT COUNT(*) FROM {_TABLE}").fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> LatencyCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_cached(
    backend: LatencyBackend,
    cache: LatencyCache | None,
    module: nn.Module,
    input_shape: Sequence[int],
    **kw: int,
) -> tuple[float, bool]:
    """(ms, cache hit) for ``module`` at ``input_shape``; measures and stores on a miss.

    The value is the raw median; subtract ``backend.overhead_ms(input_shape)`` (or the cached
    time of ``nn.Identity()`` at that shape) when summing block latencies.
    """
    if cache is None:
        return backend.measure(module, input_shape, **kw), False
    key, signature = backend.cache_key(), module_signature(module)
    hit = cache.get(key, signature, input_shape)
    if hit is not None:
        return hit.ms, True
    times = backend.measure_interleaved({"module": (module, input_shape)}, rounds=1, **kw)
    cache.put(key, signature, input_shape, CachedTiming(times["module"], 0.0, times.exporter))
    return times["module"], False


@dataclass(frozen=True)
class GroupTiming:
    """One group of modules at one input shape, from the cache or timed together.

    ``ms`` is each module's time above the per-call floor of the group it was timed in,
    ``measured_ms`` its time as measured (floor included: what a whole network costs),
    ``floor_ms`` the floor at this shape as last measured, ``exporters`` each module's
    exporter tag, ``hits`` how many modules came from the cache.
    """

    ms: dict[str, float]
    measured_ms: dict[str, float]
    floor_ms: float
    exporters: dict[str, str]
    hits: int


_FLOOR = "__floor__"


def measure_cached_group(
    backend: LatencyBackend,
    cache: LatencyCache,
    modules: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    rounds: int = 5,
    **kw: int,
) -> GroupTiming:
    """Times above the per-call floor for ``modules`` at one input shape, cached.

    Uncached modules are timed interleaved with each other and with an identity graph (the
    floor), from one exporter, so a slow spell of the machine shifts them together and their
    differences, which is what the search compares, stay true. The cache keeps each module's
    time above the floor measured in its own group (a later group's floor never changes it).
    """
    key = backend.cache_key()
    signatures = {name: "net:" + module_signature(m) for name, m in modules.items()}
    found = {name: cache.get(key, sig, input_shape) for name, sig in signatures.items()}
    floor_sig = "floor:" + module_signature(nn.Identity())
    floor = cache.get(key, floor_sig, input_shape)
    missing = [name for name, row in found.items() if row is None]
    if missing or floor is None:
        # one item per signature: equal modules share one row, so they must share one time
        todo: dict[str, str] = {}
        for name in missing:
            todo.setdefault(signatures[name], name)
        items = {name: (modules[name], input_shape) for name in todo.values()}
        items[_FLOOR] = (nn.Identity(), input_shape)
        times = backend.measure_interleaved(items, rounds=rounds, **kw)
        floor = CachedTiming(times[_FLOOR], 0.0, times.exporters[_FLOOR])
        cache.put(key, floor_sig, input_shape, floor)
        fresh = {
            sig: CachedTiming(max(times[name] - floor.ms, 0.0), floor.ms, times.exporters[name])
            for sig, name in todo.items()
        }
        for sig, row in fresh.items():
            cache.put(key, sig, input_shape, row)
        found.update({name: fresh[signatures[name]] for name in missing})
    rows = {name: row for name, row in found.items() if row is not None}
    return GroupTiming(
        ms={name: row.ms for name, row in rows.items()},
        measured_ms={name: row.measured_ms for name, row in rows.items()},
        floor_ms=floor.ms,
        exporters={name: row.exporter for name, row in rows.items()},
        hits=len(modules) - len(missing),
    )
