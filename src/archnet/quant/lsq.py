"""Learned Step Size Quantization (Esser et al., ICLR 2020) as a fake-quantizer module.

Arch-Net quantizes to 2-4 bits during distillation, where a fixed min/max scale wastes most of
the few levels available; LSQ instead learns the step by gradient descent together with the
weights, so the student adapts its ranges to the teacher's signal.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["MIN_STEP", "QUANTIZER_VERSION", "LSQQuantizer", "float_mode", "quant_range"]

MIN_BITS, MAX_BITS = 2, 8
# Changes whenever a quantizer given the same data learns something else, so checkpoints
# trained by an older one are retrained rather than reused (2: zero points for one-sided inputs;
# 3: each tensor quantized once where produced, the integer points).
QUANTIZER_VERSION = 3
# Floor on the step so a step driven towards zero by the optimiser cannot divide by zero.
MIN_STEP = 1e-8


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)``: ``[-2^(b-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value of ``x`` with its gradient multiplied by ``scale``."""
    return (x - x * scale).detach() + x * scale


class _ExportFakeQuant(torch.autograd.Function):
    """Fake-quantization that the ONNX exporter records as one placeholder node.

    The placeholder carries the bit width and signedness, which the standard Q/DQ operators
    cannot express below 8 bits; ``archnet.quant.export`` rewrites it into Q/DQ pairs.
    """

    @staticmethod
    def forward(ctx, x, step, bits, signed, axis, qmin, qmax, export_id):  # noqa: ARG004
        shape = [1] * x.dim()
        if step.numel() > 1:
            shape[axis] = -1
        s = step.clamp_min(MIN_STEP).reshape(shape)
        return torch.clamp(x / s, qmin, qmax).round() * s

    @staticmethod
    def symbolic(g, x, step, bits, signed, axis, qmin, qmax, export_id):  # noqa: ARG004
        attrs = {"bits_i": bits, "signed_i": int(signed), "axis_i": axis, "id_i": export_id}
        out = g.op("archnet::FakeQuant", x, step, **attrs)
        out.setType(x.type())
        return out


class LSQQuantizer(nn.Module):
    """Fake-quantizes ``x -> round(clamp(x / s, qmin, qmax)) * s`` with a learned step ``s``.

    Rounding uses a straight-through estimator and the step's gradient is scaled by
    ``1 / sqrt(numel_per_scale * qmax)`` as in LSQ, which keeps step updates commensurate with
    weight updates. The step is initialised from the first batch it sees (``2 mean|x| /
    sqrt(qmax)``); the ``initialized`` buffer travels with the state dict so a loaded
    checkpoint is never re-initialised.

    An unsigned grid may carry an integer zero point ``z``: it then spans ``[-z, 2^b-1-z]``
    steps, so ``qmin``/``qmax`` are the grid shifted by ``-z`` and the forward is unchanged.
    A QuantizeLinear with zero point ``z`` computes exactly this.
    """

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        per_channel: bool = False,
        channel_axis: int = 0,
        num_channels: int | None = None,
        infer_sign: bool = False,
    ) -> None:
        super().__init__()
        quant_range(bits, signed)  # validates
        self.bits = bits
        self._signed = signed
        self.per_channel = per_channel
        self.channel_axis = channel_axis
        self.infer_sign = infer_sign
        n = num_channels if (per_channel and num_channels) else 1
        self.step = nn.Parameter(torch.ones(n))
        self.register_buffer("initialized", torch.tensor(False))
        # Saved with the state dict: the sign and zero point may be decided from data.
        self.register_buffer("is_signed", torch.tensor(signed))
        self.register_buffer("zero_point", torch.tensor(0))
        self._zero_point = 0
        # Set by the QDQ exporter so each exported node can be traced back to its quantizer.
        self.export_id = -1
        self.enabled = True  # off: the identity (see ``float_mode``)

    @property
    def signed(self) -> bool:
        return self._signed

    @signed.setter
    def signed(self, value: bool) -> None:
        self._signed = bool(value)
        self.is_signed.fill_(self._signed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        key = prefix + "zero_point"
        if key not in state_dict:  # saved before zero points existed: there were none
            state_dict = {**state_dict, key: torch.tensor(0)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._signed = bool(self.is_signed)
        self._zero_point = int(self.zero_point)

    @property
    def zero_point_value(self) -> int:
        """The integer the stored grid's zero sits at (0 unless an unsigned grid is shifted)."""
        return self._zero_point

    def set_zero_point(self, value: int) -> None:
        lo, hi = quant_range(self.bits, self._signed)
        if (self._signed and value) or not lo <= value <= hi:
            raise ValueError(f"zero point {value} does not fit the grid [{lo}, {hi}]")
        self._zero_point = int(value)
        self.zero_point.fill_(self._zero_point)

    @property
    def qmin(self) -> int:
        return quant_range(self.bits, self._signed)[0] - self._zero_point

    @property
    def qmax(self) -> int:
        return quant_range(self.bits, self._signed)[1] - self._zero_point

    def extra_repr(self) -> str:
        kind = f"per_channel(axis={self.channel_axis})" if self.per_channel else "per_tensor"
        sign = "inferred" if self.infer_sign and not bool(self.initialized) else self._signed
        zero = f", zero_point={self._zero_point}" if self._zero_point else ""
        return f"bits={self.bits}, signed={sign}{zero}, {kind}"

    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        axis = self.channel_axis % x.dim()
        return [d for d in range(x.dim()) if d != axis]

    def _step_shape(self, x: torch.Tensor) -> list[int]:
        shape = [1] * x.dim()
        if self.per_channel:
            shape[self.channel_axis % x.dim()] = -1
        return shape

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the step from ``x`` with LSQ's rule (per channel when ``per_channel``).

        With ``infer_sign``, an input without negative values (one that follows a ReLU, or
        an image in [0, 1]) is quantized unsigned, which gains one bit of resolution; so is
        one whose negative tail is short (after SiLU or GELU, whose minimum is -0.28 and
        -0.17), on a grid shifted by a zero point, where a signed grid would spend half its
        levels on values that hardly occur. Two-sided inputs keep the signed grid.
        """
        if self.infer_sign:
            self.signed, zero = self._sign_from(x)
            self.set_zero_point(zero)
        if self.per_channel:
            mean_abs = x.detach().abs().mean(dim=self._reduce_dims(x))
        else:
            mean_abs = x.detach().abs().mean().reshape(1)
        step = (2 * mean_abs / math.sqrt(self.qmax)).clamp_min(MIN_STEP).to(self.step.dtype)
        if step.shape != self.step.shape:
            # Channel count learned from the first tensor; create optimisers after this call.
            self.step.data = step.clone()
        else:
            self.step.copy_(step)
        self.initialized.fill_(True)

    def _sign_from(self, x: torch.Tensor) -> tuple[bool, int]:
        """(signed, zero point) for a per-tensor input: unsigned with the zero point that keeps
        its minimum on the grid, unless that would give negatives a quarter of it or more."""
        low = float(x.detach().min())
        if low >= 0:
            return False, 0
        if self.per_channel:
            return True, 0
        qmax = quant_range(self.bits, False)[1]
        step = max(2 * float(x.detach().abs().mean()) / math.sqrt(qmax), MIN_STEP)
        zero = round(-low / step)
        return (True, 0) if zero >= (qmax + 1) // 4 else (False, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        exporting = torch.onnx.is_in_onnx_export()
        if not exporting and not bool(self.initialized):
            self.initialize(x)
        step = self.step.clamp_min(MIN_STEP)
        if exporting:
            axis = self.channel_axis % x.dim() if self.per_channel else -1
            return _ExportFakeQuant.apply(
                x, step, self.bits, self._signed, axis, self.qmin, self.qmax, self.export_id
            )
        grad_scale = 1.0 / math.sqrt(x.numel() / step.numel() * self.qmax)
        s = _grad_scale(step, grad_scale).reshape(self._step_shape(x))
        return _round_ste(torch.clamp(x / s, self.qmin, self.qmax)) * s


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with every quantizer switched off, e.g. to check a float rewrite of it:
    with them on, a change at float rounding level flips values across rounding boundaries."""
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    previous = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, was in zip(quantizers, previous, strict=True):
            q.enabled = was
