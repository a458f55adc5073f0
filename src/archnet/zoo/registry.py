"""A name -> constructor registry for the bundled teachers, in the style of timm's."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from archnet.errors import ArchnetError

__all__ = ["create_model", "is_model", "list_models", "register_model"]

_F = TypeVar("_F", bound=Callable[..., nn.Module])
_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: _F) -> _F:
    """Decorator: make `fn` creatable by its function name through `create_model`."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model '{name}' is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model by name; extra keyword arguments go to its constructor."""
    if name not in _MODELS:
        raise ArchnetError(
            f"unknown model '{name}'; choose one of: {', '.join(list_models()) or '(none)'}"
        )
    return _MODELS[name](num_classes=num_classes, **kwargs)
