"""Hardware targets and the latency backends that time candidate blocks on them."""

from archnet.targets.latency import (
    LatencyBackend,
    LatencyCache,
    get_backend,
    measure_cached,
    module_signature,
)
from archnet.targets.target import Rules, Target, list_targets, load_target

__all__ = [
    "LatencyBackend",
    "LatencyCache",
    "Rules",
    "Target",
    "get_backend",
    "list_targets",
    "load_target",
    "measure_cached",
    "module_signature",
]
