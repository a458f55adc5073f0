"""Load a teacher from a string: ``timm:NAME``, ``zoo:NAME`` or ``package.module:factory``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from archnet.errors import ArchnetError

_SOURCES: dict[str, Callable[[str, int | None], nn.Module]] = {}


def register_source(prefix: str):
    """Register a model source so ``PREFIX:NAME`` strings resolve without an if-chain."""

    def deco(fn: Callable[[str, int | None], nn.Module]):
        _SOURCES[prefix] = fn
        return fn

    return deco


@register_source("timm")
def _timm(name: str, num_classes: int | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ArchnetError(f"unknown timm model {name!r}; see timm.list_models() for names")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=False, **kw)


@register_source("zoo")
def _zoo(name: str, num_classes: int | None) -> nn.Module:
    from archnet.zoo import create_model

    return create_model(name, **({} if num_classes is None else {"num_classes": num_classes}))


def _factory(spec: str, num_classes: int | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ArchnetError(
            f"cannot import model factory {spec!r} ({e}); use 'timm:NAME', 'zoo:NAME' or "
            "'package.module:factory' with the package on PYTHONPATH"
        ) from None
    model = fn() if num_classes is None else fn(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ArchnetError(f"model factory {spec!r} returned {type(model).__name__}, not a Module")
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict: plain, or under 'state_dict'/'model'/'state_dict_ema'."""
    path = Path(path)
    if not path.is_file():
        raise ArchnetError(f"checkpoint {path} does not exist; pass --checkpoint PATH to a .pth")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ArchnetError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ArchnetError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _classifier_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Class count a checkpoint implies, when it differs from the model's default head."""
    name = (
        getattr(model, "default_cfg", {}).get("classifier")
        if hasattr(model, "default_cfg")
        else None
    )
    if name and f"{name}.weight" in state:
        n = state[f"{name}.weight"].shape[0]
        current = model.get_submodule(name).weight.shape[0]
        return n if n != current else None
    return None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names what does not fit instead of printing a traceback."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", shapes),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise ArchnetError(
            f"checkpoint {source} does not fit the model: {', '.join(parts)}; "
            "check --model matches the architecture the checkpoint was trained with"
        )
    model.load_state_dict(state)


def load_model(spec: str, checkpoint: str | Path | None = None) -> nn.Module:
    """Build the model ``spec`` names and load ``checkpoint`` into it (eval mode)."""
    prefix, sep, name = spec.partition(":")
    if not sep or not name:
        raise ArchnetError(
            f"--model {spec!r} is not understood; use 'timm:NAME', 'zoo:NAME' or "
            "'package.module:factory'"
        )
    source = _SOURCES.get(prefix)
    build = (lambda n: source(name, n)) if source else (lambda n: _factory(spec, n))
    model = build(None)
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        classes = _classifier_classes(model, state)
        if classes is not None:
            model = build(classes)
        load_state(model, state, str(checkpoint))
    return model.eval()
