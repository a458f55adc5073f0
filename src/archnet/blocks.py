"""Find a teacher's blocks and record their shapes, layouts and context inputs.

A *block* is a submodule (by qualified name) called once per forward with a stream tensor
first (plus any context: masks, flags) that returns a tensor, or a tuple led by one. The
pipeline replaces blocks one at a time, so everything else (stem, head, glue) stays the
teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from archnet.chains import chained_blocks, forward_failed, has_groups
from archnet.context import ContextInput, context_names, split_call, stream_of
from archnet.errors import ArchnetError

LAYOUTS = ("nchw", "nhwc", "ncl", "tokens", "vector")
# the channel axis of each layout, in a shape without the batch dimension (ncl: 1-D conv maps)
_CHANNEL_AXIS = {"nchw": 0, "nhwc": -1, "ncl": 0, "tokens": -1, "vector": -1}
_SPATIAL_AXES = {"nchw": (1, 2), "nhwc": (0, 1), "ncl": (1,)}


@dataclass(frozen=True)
class BlockSpec:
    """One teacher block: its stream tensor's shapes without the batch dimension and layout
    ((C, H, W) for ``nchw``, (H, W, C) for ``nhwc``, (N, C) for ``tokens``), the extra inputs
    it is called with (``context``) and its output structure (``out_arity``: 0 for a tensor,
    else a tuple of that many items with the stream first)."""

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    layout: str = "nchw"
    context: tuple[ContextInput, ...] = ()
    out_arity: int = 0

    @property
    def in_ch(self) -> int:
        return self.in_shape[_CHANNEL_AXIS[self.layout]]

    @property
    def out_ch(self) -> int:
        return self.out_shape[_CHANNEL_AXIS[self.layout]]

    @property
    def stride(self) -> int:
        """Spatial down-sampling factor, 0 when the block does not shrink every spatial axis by
        one integer factor (see ``strides`` for per-axis factors)."""
        axes = _SPATIAL_AXES.get(self.layout)
        if axes is None or len(self.in_shape) <= max(axes):  # tokens, vectors: no spatial axes
            return 1 if self.in_shape[:-1] == self.out_shape[:-1] else 0
        factors = self.strides
        return factors[0] if factors and len(set(factors)) == 1 else 0

    @property
    def strides(self) -> tuple[int, ...] | None:
        """Down-sampling factor per spatial axis (``(2, 1)``: height halved, width kept); None
        when some axis does not shrink by an integer factor or the layout has no such axes."""
        axes = _SPATIAL_AXES.get(self.layout)
        if (
            axes is None
            or len(self.in_shape) <= max(axes)
            or len(self.out_shape) != len(self.in_shape)
        ):
            return None
        sides = [(self.in_shape[a], self.out_shape[a]) for a in axes]
        if any(not o or i % o for i, o in sides):
            return None
        return tuple(i // o for i, o in sides)

    @property
    def same_shape(self) -> bool:
        return self.in_shape == self.out_shape

    def channels_first(self) -> BlockSpec:
        """This NHWC block as the NCHW block an NCHW candidate is built for."""
        if self.layout != "nhwc":
            raise ValueError(f"block {self.name} is {self.layout}, not nhwc")

        def move(shape: tuple[int, ...]) -> tuple[int, ...]:
            return (shape[-1], *shape[:-1])

        return BlockSpec(self.name, move(self.in_shape), move(self.out_shape), "nchw")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "layout": self.layout,
            "context": [c.to_dict() for c in self.context],
            "out_arity": self.out_arity,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockSpec:
        """Read back ``to_dict``; runs written before layouts existed held NCHW tensors."""
        return cls(
            d["name"],
            tuple(d["in_shape"]),
            tuple(d["out_shape"]),
            d.get("layout", "nchw"),
            tuple(ContextInput(**c) for c in d.get("context", [])),
            d.get("out_arity", 0),
        )


# Block patterns of common families, tried in order. A pattern is dot-aware: each segment is
# an fnmatch pattern and the segment count must match, so "blocks.*" never matches "blocks.0.conv".
FAMILY_PATTERNS: dict[str, str] = {
    "swin": "layers.*.blocks.*",
    # timm HRNet: each branch's blocks, the transitions to new branches, the head's blocks (the
    # branch fusion takes and returns lists: it stays glue); named first, as the rest is optional
    "hrnet": "stage*.*.branches.*.*,layer1.*,transition*.*,incre_modules.*",  # timm Swin (before "layer*.*", which would take its stages)
    "resnet": "layer*.*",  # timm ResNet / ResNeSt / ResNeXt, torchvision ResNet
    "efficientnet": "blocks.*.*",  # timm EfficientNet / MobileNetV2-V3 / MnasNet
    "convnext": "stages.*.blocks.*",  # timm ConvNeXt
    "regnet": "s[0-9].b[0-9]*",  # timm RegNet
    "stages": "stages.*.*",  # other staged timm models
    "densenet": "features.denseblock*",  # timm / torchvision DenseNet: each dense block
    "dla": "level*",  # timm DLA: each level (its trees aggregate inside)
    "blocks": "blocks.*",  # flat block lists (ViT-style, the archnet zoo)
    "features": "features.*",  # torchvision MobileNet / VGG-style
    "sequential": "*",  # a plain nn.Sequential: its top-level children
}
# then the generic rule (archnet.chains): the deepest containers whose children run in sequence


def match_name(name: str, pattern: str) -> bool:
    """Dot-aware glob: ``layer*.*`` matches ``layer1.0`` but not ``layer1.0.conv1``."""
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatch(p, q) for p, q in zip(parts, pats, strict=False))


def _is_container(module: nn.Module) -> bool:
    """A block is a composite of layers, never a single conv/BN/activation."""
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def _weightless_stand_in(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


def _family_names(model: nn.Module, family: str) -> list[str]:
    """A family's block names: its first pattern must match, the others may add blocks."""
    first, *rest = [p.strip() for p in family.split(",")]
    names = _candidate_names(model, [first], containers_only=True)
    return _candidate_names(model, [first, *rest], containers_only=True) if names else []


def _candidate_names(model: nn.Module, patterns: list[str], containers_only: bool) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not name or not any(match_name(name, p) for p in patterns):
            continue
        if containers_only and not _is_container(module):
            if _weightless_stand_in(module):
                continue  # an nn.Identity where a sibling has a block (HRNet's transitions)
            return []  # a pattern that reaches single layers is at the wrong depth
        if any(True for _ in module.parameters()):
            names.append(name)
    # drop names nested inside another match: a block is never inside another block
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


@dataclass
class _Call:
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    context: dict[str, Any]
    arity: int


def _layout(first_layer: nn.Module | None, in_shape: tuple[int, ...]) -> str:
    """The stream's layout, read from the first layer with weights the block runs on it: a
    convolution or 2-D batch norm over axis 0 reads NCHW, a linear layer or LayerNorm over the
    last axis reads channels last (NHWC for images, tokens for sequences)."""
    if len(in_shape) == 1:
        return "vector"
    if len(in_shape) == 2:
        return "ncl" if _reads_axis0(first_layer, in_shape, nn.Conv1d, nn.BatchNorm1d) else "tokens"
    channels_first = _reads_axis0(first_layer, in_shape, nn.Conv2d, nn.BatchNorm2d)
    width = getattr(first_layer, "in_features", None)
    if isinstance(first_layer, nn.LayerNorm):
        width = first_layer.normalized_shape[-1]
    if not channels_first and width == in_shape[-1]:
        return "nhwc" if len(in_shape) == 3 else "tokens"
    return "nchw" if len(in_shape) == 3 else "tokens"


def _reads_axis0(layer: nn.Module | None, shape: tuple[int, ...], *kinds: type) -> bool:
    """Whether ``layer`` is a convolution or batch norm of ``kinds`` over axis 0 of ``shape``."""
    channels = getattr(layer, "in_channels", getattr(layer, "num_features", None))
    return isinstance(layer, kinds) and channels == shape[0]


def _first_layers(model: nn.Module, names: list[str]) -> tuple[dict[str, nn.Module], list]:
    """Hooks recording, per block, the first layer with weights that runs inside it."""
    first: dict[str, nn.Module] = {}
    handles = []
    for leaf_name, leaf in model.named_modules():
        if any(True for _ in leaf.children()) or not any(True for _ in leaf.parameters(False)):
            continue
        owner = next((n for n in names if leaf_name.startswith(n + ".")), None)
        if owner is None:
            continue

        def pre(m: nn.Module, _args, owner: str = owner) -> None:
            first.setdefault(owner, m)

        handles.append(leaf.register_forward_pre_hook(pre))
    return first, handles


def trace_blocks(model: nn.Module, names: list[str], example: torch.Tensor) -> list[BlockSpec]:
    """Run two forwards (batch sizes 2 and 3) with hooks; keep blocks called once per forward
    with a stream tensor first, recording their layout, context inputs and output structure."""
    calls: dict[str, list[_Call]] = {n: [] for n in names}
    order: list[str] = []
    bad: dict[str, str] = {}

    def hook(name: str):
        def fn(_m, args, kwargs, out):
            x, context = split_call(args, kwargs)
            y = stream_of(out)
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                bad[name] = "does not take and return a stream tensor"
                return
            arity = len(out) if isinstance(out, (tuple, list)) else 0
            calls[name].append(_Call(tuple(x.shape[1:]), tuple(y.shape[1:]), context, arity))
            order.append(name)

        return fn

    handles = [
        model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names
    ]
    first, leaf_handles = _first_layers(model, names)
    handles += leaf_handles
    was_training = model.training
    batches = (len(example), len(example) + 1)
    try:
        with torch.no_grad():
            model.eval()(example)
            runs = {n: len(c) for n, c in calls.items()}
            model(torch.cat([example, example[:1]]))
    except Exception as e:  # the user's model: any type
        raise forward_failed(e, example) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    specs = []
    for name in dict.fromkeys(order):
        if name in bad or runs[name] != 1 or len(calls[name]) != 2:
            continue
        one, two = calls[name]
        context = context_names(one.context, two.context, batches)
        layout = _layout(first.get(name), one.in_shape)
        specs.append(BlockSpec(name, one.in_shape, one.out_shape, layout, context, one.arity))
    return specs


def find_blocks(
    model: nn.Module, input_shape: tuple[int, ...], patterns: str | list[str] | None = None
) -> list[BlockSpec]:
    """The teacher's blocks in call order: from ``patterns`` (comma-separated globs) or detected.

    Detection tries the families in :data:`FAMILY_PATTERNS` and takes the first that yields at
    least two blocks at container depth; failing that, the generic rule of
    :func:`archnet.chains.chained_blocks`, which groups a plain stack's layers in ``model``.
    """
    example = torch.randn(2, *input_shape)
    if patterns:
        pats = [p.strip() for p in patterns.split(",")] if isinstance(patterns, str) else patterns
        names = _candidate_names(model, pats, containers_only=False)
        specs = trace_blocks(model, names, example) if names else []
        if not specs:
            raise ArchnetError(
                f"--blocks {','.join(pats)!r} matches no module that maps one tensor to one "
                f"tensor; list the model's module names with `print(model)` and pass a pattern "
                "such as 'layer*.*'"
            )
        return specs
    # a teacher grouped before (stored by a run) is found again by the rule that grouped it
    for pattern in () if has_groups(model) else FAMILY_PATTERNS.values():
        names = _family_names(model, pattern)
        if pattern == "*" and not isinstance(model, nn.Sequential):
            continue
        if len(names) < 2:
            continue
        specs = trace_blocks(model, names, example)
        if len(specs) >= 2:
            return specs
    names = chained_blocks(model, example)  # may group a plain stack's layers in place
    specs = trace_blocks(model, names, example) if names else []
    if len(specs) >= 2:
        return specs
    raise ArchnetError(
        f"no recognisable blocks in {type(model).__name__}; pass --blocks 'PATTERN' naming the "
        "block modules (e.g. 'layer*.*' or 'blocks.*')"
    )
