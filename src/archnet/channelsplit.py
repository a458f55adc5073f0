"""Exact output-channel splits for targets that cap a layer's channels (``max_channels``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["ChannelSplit", "split_wide_layers"]


class ChannelSplit(nn.Module):
    """One wide layer as parallel slices concatenated along channels (or features).

    Chips that cap the channels of a layer still run Concat, so a layer with too many outputs
    becomes several narrow ones; the result is exact. Too many *inputs* cannot be split this
    way (the partial sums would need an Add), so such layers are left for the checker.
    """

    def __init__(self, parts: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=self.dim)


def _slice_layer(layer: nn.Conv2d | nn.Linear, lo: int, hi: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        part = nn.Conv2d(
            layer.in_channels,
            hi - lo,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
        )
    else:
        part = nn.Linear(layer.in_features, hi - lo, layer.bias is not None)
    with torch.no_grad():
        part.weight.copy_(layer.weight[lo:hi])
        if layer.bias is not None:
            part.bias.copy_(layer.bias[lo:hi])
    return part.to(layer.weight.dtype)


def split_wide_layers(
    model: nn.Module, max_channels: int, names_to_skip: Iterable[str] = ()
) -> list[tuple[str, str, str]]:
    """Split every dense Conv2d / Linear with more than ``max_channels`` outputs, in place.

    Returns one (name, was, now) row per split made; a model that is itself one wide layer
    cannot be split in place, so it gets none (the target check reports the layer)."""
    from archnet.opconvert import describe  # here: opconvert imports this module

    skip = tuple(names_to_skip)
    rows: list[tuple[str, str, str]] = []
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Conv2d, nn.Linear) or not name:
            continue  # a root layer cannot be swapped in place: left for the checker
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        if out <= max_channels or getattr(module, "groups", 1) != 1:
            continue
        bounds = list(range(0, out, max_channels)) + [out]
        split = ChannelSplit(
            [_slice_layer(module, lo, hi) for lo, hi in zip(bounds, bounds[1:])],
            dim=1 if isinstance(module, nn.Conv2d) else -1,
        )
        model.set_submodule(name, split)
        rows.append(
            (name, describe(module), f"{len(bounds) - 1} x {type(module).__name__} + Concat")
        )
    return rows
