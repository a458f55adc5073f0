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
from archnet.quant import QuantConfig, parse_bits, prepare_qat

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


def build_choice(
    name: str,
    spec: BlockSpec,
    teacher_block: nn.Module | None,
    calibration: torch.Tensor | None = None,
    requantize: bool = True,
) -> nn.Module:
    """A fresh module for a choice: the candidate, quantized when the choice has bits.

    ``calibration`` initialises a quantized choice's steps; without it, random inputs do,
    which is enough for timing or before loading a checkpoint. ``requantize``: the target's
    quantization points (``Target.requantize``).
    """
    candidate, bits = parse_choice(name)
    module = build_candidate(candidate, spec, teacher_block)
    if bits is None:
        return module
    return quantize_from(module, bits, spec, calibration, requantize)


def quantize_from(
    module: nn.Module,
    bits: Bits,
    spec: BlockSpec,
    calibration: torch.Tensor | None = None,
    requantize: bool = True,
) -> nn.Module:
    """Fold and quantize a (trained) float block at ``bits`` and initialise its steps.

    Inside a block there is no first or last layer to spare. Without ``calibration``, random
    inputs of the block's shape set the steps: enough for timing or before loading a
    checkpoint (which batch norms fold does not depend on the values).
    """
    if calibration is None:
        calibration = torch.randn(2, *spec.in_shape)
    cfg = QuantConfig(bits[0], bits[1], first_last=None, requantize=requantize)
    return prepare_qat(module, cfg, calibration, quantize_output=True)
