"""Drop-in quantized ``nn.Conv2d`` / ``nn.Linear`` that fake-quantize weights and inputs.

They subclass the float layers so code that checks ``isinstance(m, nn.Conv2d)`` (cost models,
block locators, exporters) keeps working on a quantized student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archnet.quant.lsq import MIN_STEP, LSQQuantizer, _round_ste

__all__ = ["QuantConv2d", "QuantLinear", "QuantModule", "mark_unsigned_after_relu"]

# Activations whose output is known to be non-negative, so the next layer's input needs no
# sign bit and gains one bit of resolution.
_NON_NEGATIVE = (nn.ReLU, nn.ReLU6)


class QuantModule:
    """Mixin holding the weight (signed, per output channel) and input (per tensor) quantizers."""

    weight_bits: int
    act_bits: int
    weight_quant: LSQQuantizer
    act_quant: LSQQuantizer

    def to_float(self) -> nn.Module:
        """The float layer with the same weights: the quantizers dropped."""
        raise NotImplementedError

    def quant_bias(self) -> torch.Tensor | None:
        """The bias on the integer accumulator's grid (input step x weight step, per output
        channel), as an integer runtime adds it: onnxruntime's optimiser rounds a float bias
        there too, so a student trained with a float bias drifts once deployed (at 4 bits the
        grid is coarse). Rounding is straight-through; the steps get no gradient from it."""
        bias = self.bias
        if bias is None or not (self.act_quant.enabled and self.weight_quant.enabled):
            return bias
        exporting = torch.onnx.is_in_onnx_export()  # quantizers are set by then
        if not exporting and not (self.act_quant.initialized and self.weight_quant.initialized):
            return bias
        step = (
            self.act_quant.step.clamp_min(MIN_STEP) * self.weight_quant.step.clamp_min(MIN_STEP)
        ).detach()
        return _round_ste(bias / step) * step

    def _init_quantizers(
        self, weight_bits: int, act_bits: int, act_signed: bool | None, out: int
    ) -> None:
        """``act_signed=None`` decides the input's sign from the calibration batch."""
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.weight_quant = LSQQuantizer(weight_bits, True, True, 0, num_channels=out)
        self.act_quant = LSQQuantizer(
            act_bits, act_signed is not False, False, infer_sign=act_signed is None
        )


class QuantConv2d(QuantModule, nn.Conv2d):
    """``nn.Conv2d`` whose weight and input are LSQ fake-quantized."""

    def __init__(
        self,
        *args,
        weight_bits: int = 4,
        act_bits: int = 4,
        act_signed: bool | None = None,
        **kwargs,
    ) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_quantizers(weight_bits, act_bits, act_signed, self.out_channels)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, weight_bits: int, act_bits: int, act_signed: bool | None = None
    ) -> QuantConv2d:
        """A quantized copy of ``module`` with its weights and bias."""
        q = cls(
            **_conv_args(module), weight_bits=weight_bits, act_bits=act_bits, act_signed=act_signed
        )
        _copy_params(module, q)
        return q

    def to_float(self) -> nn.Conv2d:
        plain = nn.Conv2d(**_conv_args(self))
        _copy_params(self, plain)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.act_quant(x), self.weight_quant(self.weight)
        return self._conv_forward(x, weight, self.quant_bias())


class QuantLinear(QuantModule, nn.Linear):
    """``nn.Linear`` whose weight and input are LSQ fake-quantized."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_bits: int = 4,
        act_bits: int = 4,
        act_signed: bool | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_quantizers(weight_bits, act_bits, act_signed, out_features)

    @classmethod
    def from_float(
        cls, module: nn.Linear, weight_bits: int, act_bits: int, act_signed: bool | None = None
    ) -> QuantLinear:
        """A quantized copy of ``module`` with its weights and bias."""
        q = cls(
            **_linear_args(module),
            weight_bits=weight_bits,
            act_bits=act_bits,
            act_signed=act_signed,
        )
        _copy_params(module, q)
        return q

    def to_float(self) -> nn.Linear:
        plain = nn.Linear(**_linear_args(self))
        _copy_params(self, plain)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            x, weight = self.act_quant(x), self.weight_quant(self.weight)
            return F.linear(x, weight, self.quant_bias())
        # tokens: one (B*N, C) Gemm fed by the quantized input, not a MatMul + Add that
        # onnxruntime (1.32) rewrites into a Gemm with a QuantizeLinear of the wrong type
        flat = self.act_quant(x.reshape(-1, x.shape[-1]))
        out = F.linear(flat, self.weight_quant(self.weight), self.quant_bias())
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _conv_args(m: nn.Conv2d) -> dict:
    """What builds a Conv2d like ``m``."""
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
        "device": m.weight.device,
        "dtype": m.weight.dtype,
    }


def _linear_args(m: nn.Linear) -> dict:
    """What builds a Linear like ``m``."""
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "device": m.weight.device,
        "dtype": m.weight.dtype,
    }


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.train(src.training)


def mark_unsigned_after_relu(model: nn.Module) -> list[str]:
    """Make input quantizers unsigned where the input comes straight from a ReLU.

    Only consecutive children of an ``nn.Sequential`` are trusted: elsewhere the data flow is
    hidden in ``forward`` and a wrong guess would clip every negative input to zero. Call it
    before the first forward, which fixes the steps. Returns the qualified names changed.
    """
    changed: list[str] = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (_, prev), (name, cur) in zip(children, children[1:]):
            if isinstance(prev, _NON_NEGATIVE) and isinstance(cur, QuantModule):
                cur.act_quant.signed = False
                cur.act_quant.infer_sign = False
                changed.append(f"{seq_name}.{name}" if seq_name else name)
    return changed
