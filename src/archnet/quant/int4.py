"""Whether onnxruntime runs the export's INT4/UINT4 Q/DQ patterns correctly, probed once.

4-bit storage halves a sub-8-bit model's weights on disk, but onnxruntime's graph optimisers
do not handle every 4-bit Q/DQ pattern (a Clip before a 4-bit QuantizeLinear, or a 4-bit
Q/DQ moved across a MaxPool, can make session creation fail) and which ones they handle
changes between versions. So each pattern the export writes is run on a small graph whose
answer is exact (integer data, power-of-two scales: no float rounding anywhere), once as
written (``ORT_DISABLE_ALL``) and once fully optimised (``ORT_ENABLE_ALL``). The export
stores a tensor as 4-bit only where its pattern passed both; elsewhere it uses an 8-bit
container.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from archnet.errors import ArchnetError
from archnet.quant.qdq import Emitted, activation_qdq, storage_for, weight_dq

__all__ = [
    "INT4_OPSET",
    "LEVELS",
    "Case",
    "ProbeResult",
    "int4_patterns",
    "int4_probe",
    "int4_supported",
    "run_case",
]

INT4_OPSET = 21  # first opset with INT4/UINT4 in QuantizeLinear/DequantizeLinear
_IR_VERSION = 10  # the oldest IR with 4-bit types, so older onnxruntime builds load it
LEVELS = {
    "as_written": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "optimised": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# The probe's answers are exact, so anything above float noise is a real difference.
TOLERANCE_STEPS = 1e-3


@dataclass(frozen=True)
class Case:
    """A graph, its inputs, the answer it must give, and the size of one output step."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    expected: np.ndarray
    step: float


@dataclass(frozen=True)
class ProbeResult:
    """How far onnxruntime's answer was, in output steps, per optimisation level."""

    pattern: str
    drift_steps: dict[str, float | None]  # None: the session failed (see ``error``)
    error: str | None = None

    @property
    def correct(self) -> bool:
        return all(d is not None and d <= TOLERANCE_STEPS for d in self.drift_steps.values())


def _session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # a refused pattern raises; its log line would only repeat it
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_case(pattern: str, case: Case) -> ProbeResult:
    """Run ``case`` at every level of ``LEVELS``; drift is ``max |got - expected| / step``."""
    drift: dict[str, float | None] = {}
    errors: list[str] = []
    for level_name, level in LEVELS.items():
        try:
            (got,) = _session(case.model, level).run(None, case.feeds)
        except Exception as exc:  # a refused or broken pattern is an answer, not a crash
            drift[level_name] = None
            errors.append(f"{level_name}: {type(exc).__name__}: {str(exc).strip()[:300]}")
            continue
        if got.shape != case.expected.shape:
            drift[level_name] = float("inf")
            continue
        drift[level_name] = float(np.abs(got - case.expected).max() / case.step)
    return ProbeResult(pattern, drift, "; ".join(errors) or None)


# --- the probe network ----------------------------------------------------------------------
# x -> Q/DQ (signed) -> Conv 3x3 -> Relu -> Q/DQ (unsigned, zero point 1) -> Conv 3x3 -> Relu
# -> MaxPool 2x2 -> Q/DQ (unsigned) -> Flatten -> Gemm, every weight a DQ of stored integers
# (per channel): layers as the export writes them, including an input quantized after a max-pool, which
# onnxruntime's optimiser moves the Q/DQ pair across. Scales are powers of two and data
# integers, so every product and sum is exact in float32 and rounding ties are resolved by the
# spec (half to even). Conv biases lie on the accumulator's grid (input step x weight step):
# onnxruntime >= 1.2x rounds a float conv bias to that grid when it optimises a QDQ graph,
# for int8 and int4 storage alike, and the probe asks about 4-bit storage only.

_X_STEP, _ACT_STEP = 0.5, 1.0


def _steps(count: int, first: int, spread: int) -> np.ndarray:
    """Per-channel power-of-two steps ``2^-(first + c % spread)``: distinct, so a DQ that
    applied the wrong channel's scale would show."""
    return np.array([2.0 ** -(first + c % spread) for c in range(count)], np.float32)


def _probe_net(weight_4bit: bool, act_4bit: bool, act_bits: int) -> Case:
    """The probe network with the given storage; the numbers do not depend on the storage."""
    rng = np.random.default_rng(0)
    w_store = storage_for(True, weight_4bit)
    x_store, a_store = storage_for(True, act_4bit), storage_for(False, act_4bit)
    xmin, xmax = -(2 ** (act_bits - 1)), 2 ** (act_bits - 1) - 1
    amax = 2**act_bits - 1
    # inputs: integers around the grid (some outside it, to check saturation) plus an offset
    x_int = rng.integers(xmin - 2, xmax + 3, (2, 4, 4, 4))
    x = ((x_int + rng.uniform(-0.375, 0.375, x_int.shape)) * _X_STEP).astype(np.float32)
    w1, w2 = rng.integers(-8, 8, (8, 4, 3, 3)), rng.integers(-8, 8, (8, 8, 3, 3))
    w3 = rng.integers(-8, 8, (5, 8 * 2 * 2))
    s1, s2, s3 = _steps(8, 2, 3), _steps(8, 5, 2), _steps(5, 3, 2)
    b1 = (rng.integers(-64, 65, 8) * _X_STEP * s1).astype(np.float32)
    b2 = (rng.integers(-64, 65, 8) * _ACT_STEP * s2).astype(np.float32)
    b3 = (0.25 * np.arange(5)).astype(np.float32)

    parts: list[Emitted] = [
        activation_qdq("x", "input", "x_dq", _X_STEP, (xmin, xmax), x_store),
        weight_dq("w1", "w1_quantized", w1, s1, 0, w_store, "w1_dq"),
        # a grid shifted by a zero point, as inputs with a short negative tail get
        activation_qdq("a", "relu1", "a_dq", _ACT_STEP, (-1, amax - 1), a_store),
        weight_dq("w2", "w2_quantized", w2, s2, 0, w_store, "w2_dq"),
        activation_qdq("p", "pool", "p_dq", _ACT_STEP, (0, amax), a_store),
        weight_dq("w3", "w3_quantized", w3, s3, 0, w_store, "w3_dq"),
    ]
    layers = [
        [
            helper.make_node("Conv", ["x_dq", "w1_dq", "b1"], ["conv1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv1"], ["relu1"]),
        ],
        [
            helper.make_node("Conv", ["a_dq", "w2_dq", "b2"], ["conv2"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv2"], ["relu2"]),
            helper.make_node("MaxPool", ["relu2"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        ],
        [
            helper.make_node("Flatten", ["p_dq"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w3_dq", "b3"], ["output"], transB=1),
        ],
    ]
    nodes = [
        n
        for i, layer in enumerate(layers)
        for n in parts[2 * i].nodes + parts[2 * i + 1].nodes + layer
    ]
    inits = [i for p in parts for i in p.initializers]
    inits += [numpy_helper.from_array(b, f"b{i}") for i, b in enumerate((b1, b2, b3), 1)]
    graph = helper.make_graph(
        nodes,
        "int4_probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", INT4_OPSET)])
    model.ir_version = _IR_VERSION

    # the answer, in float64 from the integers
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, np.float64))

    def act(v: torch.Tensor, lo: int, hi: int, step: float) -> torch.Tensor:
        return torch.clamp(torch.round(v / step), lo, hi) * step

    def per_channel(w: np.ndarray, s: np.ndarray) -> torch.Tensor:
        return t(w) * t(s).reshape(-1, *[1] * (w.ndim - 1))

    h = act(t(x), xmin, xmax, _X_STEP)
    h = F.conv2d(h, per_channel(w1, s1), t(b1), padding=1).relu()
    h = F.conv2d(act(h, -1, amax - 1, _ACT_STEP), per_channel(w2, s2), t(b2), padding=1).relu()
    h = act(F.max_pool2d(h, 2), 0, amax, _ACT_STEP).flatten(1)
    w3f = per_channel(w3, s3)
    y = F.linear(h, w3f, t(b3))
    step = _ACT_STEP * float(w3f.abs().sum(1).max())
    return Case(model, {"input": x}, y.numpy(), step)


# pattern -> builder of its case, given the results of the patterns before it (registry order)
_PATTERNS: dict[str, Callable[[dict[str, ProbeResult]], Case]] = {}


def _pattern(name: str):
    def register(fn: Callable[[dict[str, ProbeResult]], Case]):
        _PATTERNS[name] = fn
        return fn

    return register


@_pattern("weight")
def _weight_case(_: dict[str, ProbeResult]) -> Case:
    """INT4 weights (per channel, axis 0) into Conv and Gemm; activations in 8-bit containers."""
    return _probe_net(weight_4bit=True, act_4bit=False, act_bits=4)


@_pattern("activation")
def _activation_case(done: dict[str, ProbeResult]) -> Case:
    """INT4/UINT4 Q -> DQ at the full 4-bit range (one after a max-pool), beside weights
    stored as the export would store them."""
    return _probe_net(weight_4bit=done["weight"].correct, act_4bit=True, act_bits=4)


@_pattern("narrowed_activation")
def _narrowed_case(done: dict[str, ProbeResult]) -> Case:
    """Clip -> INT4/UINT4 Q -> DQ for a 3-bit activation (2-3 bit inputs are written so)."""
    return _probe_net(weight_4bit=done["weight"].correct, act_4bit=True, act_bits=3)


def int4_patterns() -> list[str]:
    """The 4-bit patterns the export writes, in probe order."""
    return list(_PATTERNS)


@functools.cache
def int4_probe() -> dict[str, ProbeResult]:
    """Each pattern's result with the installed onnxruntime on CPU (computed once)."""
    done: dict[str, ProbeResult] = {}
    for name, build in _PATTERNS.items():
        try:
            case = build(done)
        except Exception as exc:  # e.g. an onnx too old for 4-bit types
            done[name] = ProbeResult(name, dict.fromkeys(LEVELS), f"{type(exc).__name__}: {exc}")
            continue
        done[name] = run_case(name, case)
    return done


def int4_supported(pattern: str | None = None) -> bool:
    """Whether onnxruntime runs ``pattern`` (see ``int4_patterns``; None: all) correctly."""
    results = int4_probe()
    if pattern is None:
        return all(r.correct for r in results.values())
    if pattern not in results:
        raise ArchnetError(
            f"unknown int4 pattern {pattern!r}; use one of: {', '.join(int4_patterns())}"
        )
    return results[pattern].correct
