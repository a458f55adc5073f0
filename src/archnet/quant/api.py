"""Whole-model entry points: configure, fold batch norm, swap layers, count bits."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from archnet.opconvert import convert_module, get_converter
from archnet.quant.integer import RequantPoint, integer_points, share_quantizers
from archnet.quant.lsq import float_mode
from archnet.quant.modules import QuantConv2d, QuantLinear, QuantModule, mark_unsigned_after_relu
from archnet.tokenconvert import MatMulAttention, exact_attention

__all__ = [
    "QuantConfig",
    "calibrate",
    "fold_bn",
    "is_quantized",
    "model_size_bits",
    "parse_bits",
    "prepare_qat",
    "quantize_model",
    "strip_quantizers",
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
    # quantize every tensor once where an integer chip requantizes it (``integer_points``);
    # False: only layer inputs, a graph runtimes cannot fuse into integer kernels
    requantize: bool = True

    @classmethod
    def from_string(cls, text: str, first_last: tuple[int, int] | None = (8, 8)) -> QuantConfig:
        w, a = parse_bits(text)
        return cls(weight_bits=w, act_bits=a, first_last=first_last)


_LAYERS = (nn.Conv2d, nn.Linear)


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module, cfg: QuantConfig | None = None, filter_fn: FilterFn | None = None
) -> list[str]:
    """Swap every ``nn.Conv2d`` / ``nn.Linear`` (in place) for its quantized version.

    ``filter_fn(module, qualified_name)`` chooses which layers to swap; layers already
    quantized are kept. The first and last layers of the whole model (definition order, before
    filtering, quantized or not) get ``cfg.first_last``.
    Inputs that directly follow a ReLU in an ``nn.Sequential`` are quantized unsigned.
    Attention becomes the exact :class:`MatMulAttention` first, whose matmul inputs (q, k, v,
    the softmax probabilities) get activation quantizers too.
    Returns the qualified names of the swapped layers.
    """
    cfg = cfg or QuantConfig()
    _explicit_attention(model)
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, _LAYERS)]
    if not layers:
        return []
    edge = {layers[0][0], layers[-1][0]} if cfg.first_last is not None else set()
    swapped: list[str] = []
    for name, module in layers:
        if isinstance(module, QuantModule) or (
            filter_fn is not None and not filter_fn(module, name)
        ):
            continue
        w, a = cfg.first_last if name in edge else (cfg.weight_bits, cfg.act_bits)
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        _set_submodule(model, name, cls.from_float(module, w, a))
        swapped.append(name)
    attention = [(n, m) for n, m in model.named_modules() if isinstance(m, MatMulAttention)]
    for name, module in attention:
        if module.quant is None and (filter_fn is None or filter_fn(module, name)):
            module.quantize_matmuls(cfg.act_bits)
    mark_unsigned_after_relu(model)
    return swapped


def _explicit_attention(model: nn.Module) -> None:
    """Attention computed inside one call (SDPA) becomes the exact MatMul/Softmax form, whose
    matmul inputs can then be quantized like a layer's."""
    for name, module in list(model.named_modules()):
        if name and get_converter(module) is exact_attention:
            new = convert_module(module)
            if new is not None:
                _set_submodule(model, name, new)


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


def _bn_remainder(bn: nn.Module) -> nn.Module | None:
    """What is left of a batch norm once folded: nothing, or the activation it fuses.

    timm's ``BatchNormAct2d`` applies dropout and an activation after normalising; any other
    subclass may do more, so it is left alone (``None``).
    """
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if isinstance(bn, nn.BatchNorm2d) and type(bn).__name__ == "BatchNormAct2d":
        return nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
    return None


def _foldable(conv: nn.Module, bn: nn.Module | None) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and not isinstance(conv, QuantModule)
        and bn is not None
        and _bn_remainder(bn) is not None
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
    )


# timm-style attribute pairs: conv -> bn, conv1 -> bn1, conv_pw -> bn_pw, ...
_CONV_NAME = re.compile(r"^conv(.*)$")


def _structural_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Conv -> BN pairs read from the structure: consecutive in an ``nn.Sequential``, or
    sibling attributes ``conv<x>``/``bn<x>`` (the timm convention)."""
    pairs = []
    for prefix, parent in model.named_modules():
        children = list(parent.named_children())
        dot = f"{prefix}." if prefix else ""
        if isinstance(parent, nn.Sequential):
            for (conv_name, _), (bn_name, _) in zip(children, children[1:]):
                pairs.append((dot + conv_name, dot + bn_name))
        else:
            names = dict(children)
            for name, _ in children:
                match = _CONV_NAME.match(name)
                if match and f"bn{match.group(1)}" in names:
                    pairs.append((dot + name, f"{dot}bn{match.group(1)}"))
    return pairs


@torch.no_grad()
def _traced_pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """Conv -> BN pairs seen in a forward pass: a BN whose input is a conv's output tensor.

    Finds pairs that names do not reveal (timm's ``conv_stem`` -> ``bn1``), and only pairs
    that ``forward`` really applies back to back.
    """
    # conv output tensor -> conv name; the tensors are kept alive, so no later tensor can
    # reuse the id of one that was freed
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []

    def conv_hook(name: str):
        return lambda _m, _args, out: produced.__setitem__(id(out), (name, out))

    def bn_hook(name: str):
        def hook(_m, args) -> None:
            if id(args[0]) in produced:
                pairs.append((produced[id(args[0])][0], name))

        return hook

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(bn_hook(name)))
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return pairs


@torch.no_grad()
def _float_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode output with any quantizers off (they would magnify float rounding)."""
    was_training = model.training
    try:
        with float_mode(model):
            return model.eval()(x)
    finally:
        model.train(was_training)


def fold_bn(model: nn.Module, example: torch.Tensor | None = None, atol: float = 1e-4) -> nn.Module:
    """Fold batch norms into the preceding convolution, replacing each with ``nn.Identity``.

    Quantizing the folded weight is what a deployed integer conv computes, so folding must
    happen before ``quantize_model``. With an ``example`` input, pairs are found by tracing
    one forward pass and the folded model is checked against the original on it (a mismatch
    above ``atol``, relative to the output's scale, raises); without one, pairs come from the
    structure (consecutive in ``nn.Sequential``, or ``conv<x>``/``bn<x>`` siblings, which
    assumes ``forward`` applies ``bn<x>`` right after ``conv<x>``). Uses running statistics:
    the result matches the model in eval mode.
    """
    pairs = _traced_pairs(model, example) if example is not None else _structural_pairs(model)
    if example is not None:
        before = _float_output(model, example)
    modules = dict(model.named_modules())
    folded: set[str] = set()
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if bn_name in folded or not _foldable(conv, bn):
            continue
        _fold(conv, bn)
        _set_submodule(model, bn_name, _bn_remainder(bn))
        folded.add(bn_name)
    if example is not None and folded:
        after = _float_output(model, example)
        err = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
        if err > atol:
            raise ValueError(f"folding batch norm changed the output by {err:.2e} (relative)")
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


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a fake-quantized one."""
    return any(isinstance(m, QuantModule) for m in model.modules())


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Initialise every quantizer's step from one forward over ``x`` (a calibration batch).

    Quantizers initialise on the first batch they see; a larger, fixed batch gives steadier
    steps than the first training batch. Create optimisers after this call.
    """
    was_training = model.training
    model.eval()
    model(x)
    model.train(was_training)


def prepare_qat(
    model: nn.Module,
    cfg: QuantConfig,
    calibration: torch.Tensor,
    *,
    quantize_output: bool = False,
    keep: tuple[str, ...] = (),
) -> nn.Module:
    """Fold batch norm, swap in quantized layers, add the points where an integer chip
    requantizes (``cfg.requantize``) and set every step: the starting point of
    quantization-aware training, in that order because each step needs the last. Returns the
    model to use: the same object, or its traced form when requantization points were added.
    ``quantize_output`` quantizes its output too (a block: the next one reads it on a grid);
    the modules named in ``keep`` (the student's blocks, quantized on their own) stay calls,
    so hooks and swaps by name still find them."""
    fold_bn(model, calibration[:2])
    quantize_model(model, cfg)
    if cfg.requantize:
        kept = {id(model.get_submodule(name)) for name in keep}
        model = integer_points(
            model,
            calibration[:2],
            cfg.act_bits,
            quantize_output=quantize_output,
            leaf=lambda m: id(m) in kept,
        )
    calibrate(model, calibration)
    if cfg.requantize:
        share_quantizers(model, calibration[:2])
    return model


def strip_quantizers(model: nn.Module) -> nn.Module:
    """Replace (in place) each quantized layer by its float layer with the same weights.

    The float twin of a quantized student: what a runtime without integer kernels runs, and
    the reference a quantized export's latency is compared with.
    """
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, RequantPoint):
            _set_submodule(model, name, nn.Identity())
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantModule):
            _set_submodule(model, name, module.to_float())
        elif isinstance(module, MatMulAttention):
            module.quant = None
    return model
