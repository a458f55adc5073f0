"""A cost model standing in for a chip that no runtime here can run (an integer-only NPU with
2-8-bit arithmetic): backend ``bitops``, its figures labelled *estimated* everywhere.

Each module is exported (QONNX for a quantized one, plain ONNX for a float one, every operand
then 32 bits) and costed by qonnx's inference-cost analysis: bit operations (MACs x weight bits x
activation bits) and bits moved (weights, and the outputs of the multiply-accumulate ops). The
target's TOML turns them into estimated milliseconds with its ``[cost]`` throughputs::

    estimated ms = bops / bops_per_ms + (weight bits + output bits) / bits_per_ms

Nothing is timed, so the figures are exact sums: the blocks and the parts outside them add up to
the whole network's estimate, and a student's QONNX export gives the search's figure again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import onnx

from archnet.errors import ArchnetError
from archnet.onnx_utils import export_onnx, exporter_of
from archnet.targets.latency import (
    EXTERNAL,
    LatencyBackend,
    Prepared,
    Runner,
    Timeable,
    Timings,
    register_backend,
)

__all__ = ["BitOpsBackend"]


@register_backend("bitops")
class BitOpsBackend(LatencyBackend):
    """Estimated cost from bit operations and bits moved (see the module docstring)."""

    devices: ClassVar[Mapping[str, Callable[[], bool]]] = {"cpu": lambda: True}
    estimated: ClassVar[bool] = True

    def __init__(
        self,
        device: str = "cpu",
        threads: int = 1,
        bops_per_ms: float | None = None,
        bits_per_ms: float | None = None,
    ) -> None:
        if not bops_per_ms or not bits_per_ms:
            raise ArchnetError(
                "the bitops cost model needs [cost] bops_per_ms and bits_per_ms in the target's "
                "TOML (the chip's bit operations and memory bits per millisecond)"
            )
        super().__init__(device, threads)
        self.bops_per_ms, self.bits_per_ms = float(bops_per_ms), float(bits_per_ms)

    def runtime(self) -> str:
        from importlib.metadata import version

        return (
            f"bitops cost model (qonnx {version('qonnx')}): {self.bops_per_ms:g} bops/ms, "
            f"{self.bits_per_ms:g} bits/ms"
        )

    def cost(self, module: Timeable, input_shape: Sequence[int]) -> tuple[dict, str]:
        """qonnx's figures for ``module`` at ``input_shape`` and the exporter tag."""
        from archnet.quant.api import is_quantized
        from archnet.quant.qonnx import bit_operations, export_qonnx

        shape = tuple(int(s) for s in input_shape)
        if isinstance(module, onnx.ModelProto):
            proto = module
        elif is_quantized(module):
            proto = export_qonnx(module, shape)
        else:
            proto = export_onnx(module, shape)
        return bit_operations(proto), exporter_of(proto) or EXTERNAL

    def estimate_ms(self, figures: Mapping[str, float]) -> float:
        moved = figures["weight_bits"] + figures["output_bits"]
        return figures["bops"] / self.bops_per_ms + moved / self.bits_per_ms

    def measure_interleaved(
        self,
        items: Mapping[str, tuple[Timeable, Sequence[int]]],
        rounds: int = 5,
        warmup: int = 10,
        repeats: int = 50,
    ) -> Timings:
        """Estimated ms per item (nothing is run: ``rounds``, ``warmup``, ``repeats`` unused)."""
        estimates, tags = {}, {}
        for key, (module, shape) in items.items():
            figures, tags[key] = self.cost(module, shape)
            estimates[key] = self.estimate_ms(figures)
        return Timings(estimates, tags, [])

    def _prepare(self, module, input_shape, exporter=None) -> Prepared:  # pragma: no cover
        raise NotImplementedError("the bitops backend estimates; it prepares nothing to run")

    def _runner(self, prepared, input_shape) -> Runner:  # pragma: no cover
        raise NotImplementedError("the bitops backend estimates; it runs nothing")
