"""OpenVINO as a latency backend (``openvino``; target ``openvino-cpu``).

The graph timed is the ONNX export onnxruntime times (QDQ for a quantized module: OpenVINO
turns it into its low-precision kernels where the CPU has them), compiled for the CPU with a
fixed thread count, one stream and the latency hint; each call is one synchronous inference
with inputs and outputs shared, not copied. The cache key holds OpenVINO's version and the
CPU, so its timings never mix with onnxruntime's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import onnx
import torch

from archnet.errors import ArchnetError
from archnet.onnx_utils import export_chain
from archnet.targets.latency import (
    LatencyBackend,
    Prepared,
    Runner,
    Timeable,
    prepare_onnx,
    register_backend,
)

__all__ = ["OpenVinoBackend"]


def _openvino():
    try:
        import openvino
    except ImportError:
        raise ArchnetError(
            "the openvino latency backend needs OpenVINO: pip install 'archnet[openvino]'"
        ) from None
    return openvino


@register_backend("openvino")
class OpenVinoBackend(LatencyBackend):
    """OpenVINO on the CPU (see the module docstring)."""

    devices: ClassVar[Mapping[str, Callable[[], bool]]] = {"cpu": lambda: True}

    def __init__(self, device: str = "cpu", threads: int = 1) -> None:
        _openvino()  # fail at construction, with the fix, not mid-run
        super().__init__(device, threads)

    def runtime(self) -> str:
        chain = ">".join(export_chain())
        return (
            f"openvino {_openvino().__version__}; onnx {onnx.__version__}; "
            f"exported by torch {torch.__version__} via {chain}"
        )

    def _prepare(
        self, module: Timeable, input_shape: tuple[int, ...], exporter: str | None = None
    ) -> Prepared:
        return prepare_onnx(module, input_shape, exporter)

    def _runner(self, prepared: Prepared, input_shape: tuple[int, ...]) -> Runner:
        ov = _openvino()
        model_bytes, x = prepared.payload
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1}
        config["PERFORMANCE_HINT"] = "LATENCY"
        compiled = core.compile_model(core.read_model(model_bytes, b""), "CPU", config)
        request = compiled.create_infer_request()
        feed = {0: x}
        return lambda: request.infer(feed, share_inputs=True, share_outputs=True)
