"""Whole-model entry points: configure, fold batch norm, swap layers, count bits."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from archnet.quant.modules import QuantConv2d, QuantLinear, QuantModule, mark_unsigned_after_relu

__all__ = [
    "QuantConfig",
    "fold_bn",
    "model_size_bits",
    "parse_bits",
    "quantize_model",
]

FilterFn = Callable[[nn.Module, str], bool]

_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


def parse_bits(text: str) -> tuple[int, int]:
    """``"w4a4" -> (4, 4)``: weight and activation bit widths, each in 2..8."""
    match = _BITS_RE.match(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"bad bit-width spec {text!r}: expected 'w<bits>a<bits>' such as 'w4a4' or 'w2a4'"
        )
    w, a = int(match.group(1)), int(match.group(2))
    for kind, bits in (("weight", w), ("activation", a)):
        if not 2 <= bits <= 8:
            raise ValueError(f"bad bit-width spec {text!r}: {kind} bits must be in 2..8")
    return w, a


@dataclass
class QuantConfig:
    """Bit widths for a quantized student.

    ``first_last`` keeps the first and last layers at higher precision ``(weight, act)``, as
    is usual for sub-8-bit networks: they hold few parameters but are the most sensitive.
    ``None`` quantizes them like every other layer.
    """

    weight_bits: int = 4
    act_bits: int = 4
    first_last: tuple[int, int] | None = (8, 8)

    @classmethod
    def from_string(cls, text: str, first_last: tuple[int, int] | None = (8, 8)) -> QuantConfig:
        w, a = parse_bits(text)
        return cls(weight_bits=w, act_bits=a, first_last=first_last)


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, QuantModule)


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module, cfg: QuantConfig | None = None, filter_fn: FilterFn | None = None
) -> list[str]:
    """Swap every ``nn.Conv2d`` / ``nn.Linear`` (in place) for its quantized version.

    ``filter_fn(module, qualified_name)`` chooses which layers to swap. The first and last
    layers of the whole model (definition order, before filtering) get ``cfg.first_last``.
    Inputs that directly follow a ReLU in an ``nn.Sequential`` are quantized unsigned.
    Returns the qualified names of the swapped layers.
    """
    cfg = cfg or QuantConfig()
    layers = [(n, m) for n, m in model.named_modules() if n and _is_layer(m)]
    if not layers:
        return []
    edge = {layers[0][0], layers[-1][0]} if cfg.first_last is not None else set()
    swapped: list[str] = []
    for name, module in layers:
        if filter_fn is not None and not filter_fn(module, name):
            continue
        w, a = cfg.first_last if name in edge else (cfg.weight_bits, cfg.act_bits)
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        _set_submodule(model, name, cls.from_float(module, w, a))
        swapped.append(name)
    mark_unsigned_after_relu(model)
    return swapped


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s running statistics and affine into ``conv`` (exact for eval-mode BN)."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * scale + beta
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and not isinstance(conv, QuantModule)
        and type(bn) is nn.BatchNorm2d
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
    )


# timm-style attribute pairs: conv -> bn, conv1 -> bn1, conv_pw -> bn_pw, ...
_CONV_NAME = re.compile(r"^conv(.*)$")


def fold_bn(model: nn.Module, named_pairs: bool = True) -> nn.Module:
    """Fold batch norms into the preceding convolution, replacing each with ``nn.Identity``.

    Quantizing the folded weight is what a deployed integer conv computes, so folding must
    happen before ``quantize_model``. Pairs are a ``Conv2d`` followed by a ``BatchNorm2d`` in
    an ``nn.Sequential`` and, with ``named_pairs``, sibling attributes ``conv<x>``/``bn<x>``
    (the timm convention, which assumes ``forward`` applies ``bn<x>`` right after
    ``conv<x>``). Uses running statistics: the result matches the model in eval mode.
    """
    for parent in list(model.modules()):
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (_, conv), (bn_name, bn) in zip(children, children[1:]):
                if _foldable(conv, bn):
                    _fold(conv, bn)
                    setattr(parent, bn_name, nn.Identity())
        elif named_pairs:
            named = dict(children)
            for name, conv in children:
                match = _CONV_NAME.match(name)
                bn_name = f"bn{match.group(1)}" if match else None
                if bn_name and _foldable(conv, named.get(bn_name)):
                    _fold(conv, named[bn_name])
                    setattr(parent, bn_name, nn.Identity())
    return model


def model_size_bits(model: nn.Module) -> int:
    """Storage for the model: quantized weights at their bit width, the rest at 32 bits.

    Floating-point buffers (e.g. batch-norm statistics) count; flags and counters do not.
    """
    quant_weights = {
        id(m.weight): m.weight_bits for m in model.modules() if isinstance(m, QuantModule)
    }
    total = 0
    for p in model.parameters():
        total += p.numel() * quant_weights.get(id(p), 32)
    for b in model.buffers():
        if b.is_floating_point():
            total += b.numel() * 32
    return total
