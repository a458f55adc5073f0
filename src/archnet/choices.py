"""What the search chooses per block: a candidate, optionally at a bit width ('mbconv_k3@w4a4').

Quantization multiplies the search space: each candidate operation can run at each of the
allowed weight/activation bit widths, and every such pair is trained, scored and costed on
its own (HANT's extension of the search to quantization). A float run has one choice per
candidate, named like the candidate.
"""

from __future__ import annotations

import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.candidates import build_candidate
from archnet.quant import QuantConfig, calibrate, fold_bn, parse_bits, quantize_model

SEP = "@"

Bits = tuple[int, int]


def bits_text(bits: Bits) -> str:
    return f"w{bits[0]}a{bits[1]}"


def choice_name(candidate: str, bits: Bits | None) -> str:
    return candidate if bits is None else f"{candidate}{SEP}{bits_text(bits)}"


def parse_choice(name: str) -> tuple[str, Bits | None]:
    """``'mbconv_k3@w4a4' -> ('mbconv_k3', (4, 4))``; a float choice has no bits."""
    candidate, sep, bits = name.partition(SEP)
    return candidate, (parse_bits(bits) if sep else None)


def quantize_block(module: nn.Module, bits: Bits, example: torch.Tensor) -> nn.Module:
    """Fold the block's batch norms and quantize every layer at ``bits`` (in place).

    Inside a block there is no first or last layer to spare. ``example`` (any input of the
    block's shape) traces which batch norms follow which convolutions; the steps stay unset
    until :func:`archnet.quant.calibrate` or a checkpoint provides them.
    """
    module.eval()
    fold_bn(module, example)
    quantize_model(module, QuantConfig(bits[0], bits[1], first_last=None))
    return module


def build_choice(
    name: str,
    spec: BlockSpec,
    teacher_block: nn.Module | None,
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """A fresh module for a choice: the candidate, quantized when the choice has bits.

    ``calibration`` initialises a quantized choice's steps; without it, random inputs do,
    which is enough for timing or before loading a checkpoint.
    """
    candidate, bits = parse_choice(name)
    module = build_candidate(candidate, spec, teacher_block)
    if bits is None:
        return module
    return quantize_from(module, bits, spec, calibration)


def quantize_from(
    module: nn.Module, bits: Bits, spec: BlockSpec, calibration: torch.Tensor | None = None
) -> nn.Module:
    """Quantize a (trained) float block and initialise its steps."""
    example = torch.randn(2, *spec.in_shape)
    quantize_block(module, bits, example)
    calibrate(module, calibration if calibration is not None else example)
    return module
