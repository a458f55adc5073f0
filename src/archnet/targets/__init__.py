"""Hardware targets, the checker that tells whether an ONNX graph runs on one, and the latency
backends that time candidate blocks on them."""

from archnet.targets.check import (
    CheckReport,
    Unverified,
    Violation,
    check_model,
    check_report,
    rejects,
)
from archnet.targets.latency import (
    LatencyBackend,
    LatencyCache,
    get_backend,
    measure_cached,
    module_signature,
)
from archnet.targets.qdq import QuantizedTensor, quantized_tensors
from archnet.targets.target import Rules, Target, list_targets, load_target

__all__ = [
    "CheckReport",
    "LatencyBackend",
    "LatencyCache",
    "QuantizedTensor",
    "Rules",
    "Target",
    "Unverified",
    "Violation",
    "check_model",
    "check_report",
    "get_backend",
    "list_targets",
    "load_target",
    "measure_cached",
    "module_signature",
    "quantized_tensors",
    "rejects",
]
