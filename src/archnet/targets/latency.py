"""Latency measurement backends, structural signatures and a resumable SQLite cache.

Every candidate block is timed at its real input shape on the backend a target names. Timings
are medians (robust to scheduler hiccups) and are cached by structure, so a block that
appears in many candidate networks or in a resumed run is timed once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import platform
import sqlite3
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from archnet.errors import ArchnetError
from archnet.onnx_utils import INPUT_NAME, ort_session, sample_input

__all__ = [
    "BACKENDS",
    "LatencyBackend",
    "LatencyCache",
    "OnnxRuntimeBackend",
    "TorchBackend",
    "get_backend",
    "measure_cached",
    "module_signature",
    "register_backend",
]

Runner = Callable[[], object]
"""One synchronous inference call; returns only after the result is ready."""

Timeable = nn.Module | onnx.ModelProto
"""A module, or an ONNX model already exported (e.g. by another quantization tool)."""

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


class LatencyBackend(ABC):
    """Times modules at a fixed input shape on one runtime, device and thread count.

    Subclasses only say how to build a runner for one module; warm-up, timing, round-robin
    interleaving and the empty-graph overhead are shared so that backends are comparable.
    """

    name: ClassVar[str] = ""
    devices: ClassVar[Mapping[str, Callable[[], bool]]] = {"cpu": lambda: True}

    def __init__(self, device: str = "cpu", threads: int = 1) -> None:
        self.device = device
        self.threads = threads
        self._overheads: dict[tuple[int, ...], float] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, threads={self.threads})"

    @abstractmethod
    def _runner(self, module: Timeable, input_shape: tuple[int, ...]) -> Runner:
        """Prepare ``module`` (export, session, device copy) and return a one-call runner.

        A fake-quantized module runs as the backend would deploy it: as a QDQ graph where the
        runtime has integer kernels, else as its float twin.
        """

    def _context(self) -> contextlib.AbstractContextManager[object]:
        """Process-wide settings held while timing (thread counts, inference mode)."""
        return contextlib.nullcontext()

    def measure(
        self,
        module: Timeable,
        input_shape: Sequence[int],
        warmup: int = 10,
        repeats: int = 50,
    ) -> float:
        """Median milliseconds of one call at ``input_shape`` (with batch), after warm-up."""
        shape = tuple(int(s) for s in input_shape)
        with self._context():
            run = self._runner(module, shape)
            for _ in range(warmup):
                run()
            samples = [_time_ms(run) for _ in range(max(1, repeats))]
        return statistics.median(samples)

    def measure_many(
        self,
        modules: Mapping[str, nn.Module],
        input_shape: Sequence[int],
        rounds: int = 5,
        warmup: int = 10,
        repeats: int = 50,
    ) -> dict[str, float]:
        """Median ms per module at one input shape, interleaved (see :meth:`measure_interleaved`)."""
        items = {key: (module, input_shape) for key, module in modules.items()}
        return self.measure_interleaved(items, rounds, warmup, repeats)

    def measure_interleaved(
        self,
        items: Mapping[str, tuple[Timeable, Sequence[int]]],
        rounds: int = 5,
        warmup: int = 10,
        repeats: int = 50,
    ) -> dict[str, float]:
        """Median ms per (module, input shape), interleaving them round-robin over ``rounds``.

        Networks being compared (teacher vs. student, a network vs. its parts) thus see the
        same thermal state and background load; a slow spell hits all of them instead of
        biasing one. ``repeats`` is the total number of samples per item, spread over rounds.
        """
        per_round = max(1, math.ceil(repeats / max(1, rounds)))
        with self._context():
            runners = {
                key: self._runner(module, tuple(int(s) for s in shape))
                for key, (module, shape) in items.items()
            }
            for run in runners.values():
                for _ in range(warmup):
                    run()
            samples: dict[str, list[float]] = {key: [] for key in runners}
            for _ in range(max(1, rounds)):
                for key, run in runners.items():
                    samples[key].extend(_time_ms(run) for _ in range(per_round))
        return {key: statistics.median(values) for key, values in samples.items()}

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


def _time_ms(run: Runner) -> float:
    start = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - start) / 1e6


@register_backend("onnxruntime")
class OnnxRuntimeBackend(LatencyBackend):
    """onnxruntime with all graph optimizations, i.e. what an ONNX deployment would run."""

    devices: ClassVar[Mapping[str, Callable[[], bool]]] = {
        "cpu": lambda: True,
        "cuda": _ort_cuda_available,
    }

    def _runner(self, module: Timeable, input_shape: tuple[int, ...]) -> Runner:
        if isinstance(module, onnx.ModelProto):
            model = module.SerializeToString()
            x = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)
        else:
            from archnet.quant.export import export_any

            model = export_any(module, input_shape).SerializeToString()
            x = sample_input(module, input_shape).cpu().numpy()
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

    def _runner(self, module: Timeable, input_shape: tuple[int, ...]) -> Runner:
        if isinstance(module, onnx.ModelProto):
            raise ArchnetError("the torch latency backend times modules, not ONNX models")
        from archnet.quant.api import strip_quantizers

        device = torch.device(self.device)
        # A private copy: eval mode and device placement must not leak into the caller's
        # module (it may be mid-training), and runners outlive this call in measure_many.
        # Eager PyTorch has no integer kernels: a quantized module runs as its float twin.
        work = strip_quantizers(copy.deepcopy(module)).to(device).eval()
        x = sample_input(work, input_shape, device=self.device)
        if device.type == "cuda":

            def run() -> None:
                work(x)
                torch.cuda.synchronize(device)

            return run
        return lambda: work(x)


def get_backend(name: str, device: str = "cpu", threads: int = 1) -> LatencyBackend:
    """Backend instance by registry name; refuses devices this machine cannot provide."""
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
    return cls(device=device, threads=threads)


def module_signature(module: nn.Module) -> str:
    """SHA-1 of a module's structure, blind to weight values.

    Two blocks with the same layers, hyper-parameters, tensor shapes and dtypes cost the same
    to run, so they share one cache row however they were initialised or trained.
    """
    h = hashlib.sha1()
    h.update(repr(module).encode())
    for name, sub in module.named_modules():
        h.update(f"\nmodule {name} {type(sub).__module__}.{type(sub).__qualname__}".encode())
    for kind, tensors in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in tensors:
            h.update(f"\n{kind} {name} {tuple(tensor.shape)} {tensor.dtype}".encode())
    return h.hexdigest()


def _shape_text(input_shape: Sequence[int]) -> tuple[str, int]:
    """Split a batched shape into the per-sample shape text and the batch size."""
    shape = [int(s) for s in input_shape]
    if not shape:
        raise ValueError("input_shape must include the batch dimension")
    return "x".join(str(s) for s in shape[1:]), shape[0]


def _platform_text() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}; torch {torch.__version__}; onnxruntime {ort.__version__}"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS latency (
    backend   TEXT    NOT NULL,
    device    TEXT    NOT NULL,
    threads   INTEGER NOT NULL,
    signature TEXT    NOT NULL,
    shape     TEXT    NOT NULL,
    batch     INTEGER NOT NULL,
    ms        REAL    NOT NULL,
    created   REAL    NOT NULL,
    platform  TEXT    NOT NULL,
    PRIMARY KEY (backend, device, threads, signature, shape, batch)
)
"""


class LatencyCache:
    """SQLite table of measured latencies; every ``put`` is committed so a killed run resumes.

    Rows record when and on which platform they were measured so stale numbers from another
    machine can be spotted, but the platform is not part of the key.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._platform = _platform_text()
        try:
            self._conn = sqlite3.connect(str(path), timeout=30.0)
            self._conn.execute(_SCHEMA)
            self._conn.commit()
        except sqlite3.DatabaseError as exc:
            raise ArchnetError(f"latency cache {path} is not a usable SQLite file: {exc}") from exc

    def get(
        self,
        backend: str,
        device: str,
        threads: int,
        signature: str,
        input_shape: Sequence[int],
    ) -> float | None:
        """Cached ms for this key, or None if it was never measured."""
        shape, batch = _shape_text(input_shape)
        row = self._conn.execute(
            "SELECT ms FROM latency WHERE backend=? AND device=? AND threads=? AND signature=?"
            " AND shape=? AND batch=?",
            (backend, device, threads, signature, shape, batch),
        ).fetchone()
        return None if row is None else float(row[0])

    def put(
        self,
        backend: str,
        device: str,
        threads: int,
        signature: str,
        input_shape: Sequence[int],
        ms: float,
    ) -> None:
        """Store (or overwrite) one measurement and commit immediately."""
        shape, batch = _shape_text(input_shape)
        self._conn.execute(
            "INSERT OR REPLACE INTO latency VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                backend,
                device,
                threads,
                signature,
                shape,
                batch,
                float(ms),
                time.time(),
                self._platform,
            ),
        )
        self._conn.commit()

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM latency").fetchone()[0])

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
    key = (backend.name, backend.device, backend.threads, module_signature(module))
    hit = cache.get(*key, input_shape)
    if hit is not None:
        return hit, True
    ms = backend.measure(module, input_shape, **kw)
    cache.put(*key, input_shape, ms)
    return ms, False


def measure_cached_group(
    backend: LatencyBackend,
    cache: LatencyCache,
    modules: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    rounds: int = 5,
    **kw: int,
) -> tuple[dict[str, float], float, int]:
    """(ms above the per-call floor per module, floor ms, cache hits) at one input shape.

    Uncached modules are timed interleaved with each other and with an identity graph (the
    floor), so a slow spell of the machine shifts them together and their differences, which
    is what the search compares, stay true. The cache keeps each module's time above the floor
    measured in its own group (a later group's floor never changes it).
    """
    key = (backend.name, backend.device, backend.threads)
    signatures = {name: "net:" + module_signature(m) for name, m in modules.items()}
    found = {name: cache.get(*key, sig, input_shape) for name, sig in signatures.items()}
    floor_sig = "floor:" + module_signature(nn.Identity())
    floor = cache.get(*key, floor_sig, input_shape)
    missing = {name: modules[name] for name, ms in found.items() if ms is None}
    if missing or floor is None:
        items = {name: (m, input_shape) for name, m in missing.items()}
        items["__floor__"] = (nn.Identity(), input_shape)
        times = backend.measure_interleaved(items, rounds=rounds, **kw)
        floor = times.pop("__floor__")
        cache.put(*key, floor_sig, input_shape, floor)
        for name, ms in times.items():
            found[name] = max(ms - floor, 0.0)
            cache.put(*key, signatures[name], input_shape, found[name])
    hits = len(modules) - len(missing)
    return {name: float(ms) for name, ms in found.items()}, float(floor), hits
