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

from archnet.errors import ArchnetError
from archnet.targets.latency import OnnxBackend, Prepared, Runner, register_backend

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
class OpenVinoBackend(OnnxBackend):
    """OpenVINO on the CPU (see the module docstring)."""

    devices: ClassVar[Mapping[str, Callable[[], bool]]] = {"cpu": lambda: True}

    def __init__(self, device: str = "cpu", threads: int = 1) -> None:
        _openvino()  # fail at construction, with the fix, not mid-run
        super().__init__(device, threads)

    def runtime_version(self) -> str:
        return f"openvino {_openvino().__version__}"

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
