"""The context a block is called with, and calling a block with it again.

A Transformer layer is rarely called with its stream tensor alone: ``nn.TransformerEncoder``
passes ``src_mask`` and ``is_causal``, Hugging Face layers an attention mask and return a tuple.
A forward hook sees none of the keyword inputs (``with_kwargs=True`` does), and a block
replayed on its cached input without them computes something else. So every extra input is
recorded once when blocks are traced (its name, and whether it follows the batch), captured
with the features, and passed back wherever a block runs alone: training, scoring, timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "BlockContext",
    "Bound",
    "ContextFree",
    "ContextInput",
    "call_block",
    "capture_context",
    "context_names",
    "split_call",
    "stream_of",
]

ARG_PREFIX = "args."  # extra positional inputs are named by position: "args.1", "args.2"


@dataclass(frozen=True)
class ContextInput:
    """One extra input of a block: ``args.N`` (position) or a keyword, tensor or not, and
    whether it follows the batch (a padding mask) or is the same for every batch (a causal
    mask, a flag)."""

    name: str
    per_sample: bool = False
    tensor: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "per_sample": self.per_sample, "tensor": self.tensor}


def split_call(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(stream input, {context name: value}) of one call."""
    extra = {f"{ARG_PREFIX}{i}": a for i, a in enumerate(args) if i > 0}
    return (args[0] if args else None), {**extra, **kwargs}


def context_names(
    first: dict[str, Any], second: dict[str, Any], batches: tuple[int, int]
) -> tuple[ContextInput, ...]:
    """The context inputs seen in two calls at different batch sizes: a tensor whose first
    dimension changed with the batch is per sample, anything else is a constant."""
    inputs = []
    for name, value in first.items():
        other = second.get(name)
        if isinstance(value, torch.Tensor):
            per_sample = (
                isinstance(other, torch.Tensor)
                and value.dim() > 0
                and (value.shape[0], other.shape[0]) == batches
            )
            inputs.append(ContextInput(name, per_sample, True))
        else:
            inputs.append(ContextInput(name, False, False))
    return tuple(inputs)


def stream_of(out: Any) -> torch.Tensor:
    """The stream tensor of a block's output: the output, or the first item of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _as_call(values: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Extra positional inputs in order, and keyword inputs."""
    positional = sorted(
        (int(k[len(ARG_PREFIX) :]), v) for k, v in values.items() if k.startswith(ARG_PREFIX)
    )
    if [i for i, _ in positional] != list(range(1, len(positional) + 1)):
        raise ValueError(f"positional context inputs are not contiguous: {sorted(values)}")
    kwargs = {k: v for k, v in values.items() if not k.startswith(ARG_PREFIX)}
    return [v for _, v in positional], kwargs


def call_block(module: nn.Module, x: torch.Tensor, context: dict[str, Any] | None = None):
    """``module(x, *extra, **keywords)`` with the recorded context; its stream output."""
    if not context:
        return stream_of(module(x))
    args, kwargs = _as_call(context)
    return stream_of(module(x, *args, **kwargs))


class BlockContext:
    """A block's recorded context over one split: constants once, per-sample tensors whole,
    sliced to the rows of each batch."""

    def __init__(self, constants: dict[str, Any], per_sample: dict[str, Any]) -> None:
        self.constants = constants
        self.per_sample = per_sample  # name -> array or tensor indexed by sample

    def __bool__(self) -> bool:
        return bool(self.constants or self.per_sample)

    def batch(self, idx: Sequence[int] | Any) -> dict[str, Any]:
        """The context of the samples ``idx`` (one batch)."""
        rows = {k: torch.as_tensor(v[idx]) for k, v in self.per_sample.items()}
        return {**self.constants, **rows}


class ContextFree(nn.Module):
    """A candidate in a block whose callers pass context it does not read (a convolution in
    place of a masked attention layer): it accepts and ignores the extra inputs, and answers
    in the teacher block's output structure (a tuple of ``arity`` items, the rest None)."""

    def __init__(self, inner: nn.Module, arity: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.arity = arity

    def forward(self, x: torch.Tensor, *_args: Any, **_kwargs: Any):
        y = self.inner(x)
        return (y, *[None] * (self.arity - 1)) if self.arity else y


@torch.no_grad()
def capture_context(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, dict]:
    """The context each named block is called with when ``model`` runs on ``x`` (one batch)."""
    seen: dict[str, dict[str, Any]] = {}

    def hook(name: str):
        def fn(_m, args, kwargs) -> None:
            seen.setdefault(name, split_call(args, kwargs)[1])

        return fn

    handles = [
        model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names
    ]
    was_training = model.training
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


class Bound(nn.Module):
    """A block with its context bound, so it runs (and exports, and is timed) from the stream
    tensor alone, as it runs inside the network: masks become constants of the graph. Tensors
    are buffers, so a latency cache keyed on the module's tensors tells two masks apart."""

    def __init__(self, inner: nn.Module, context: dict[str, Any]) -> None:
        super().__init__()
        self.inner = inner
        self._values = {k: v for k, v in context.items() if not isinstance(v, torch.Tensor)}
        self._tensors = []
        for i, (k, v) in enumerate(
            (k, v) for k, v in context.items() if isinstance(v, torch.Tensor)
        ):
            self.register_buffer(f"context_{i}", v.detach().clone())
            self._tensors.append((k, f"context_{i}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = {**self._values, **{k: getattr(self, b) for k, b in self._tensors}}
        return call_block(self.inner, x, context)
