"""Load a teacher from a string: ``timm:NAME``, ``zoo:NAME`` or ``package.module:factory``."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archnet.errors import ArchnetError

_SOURCES: dict[str, Callable[[str, dict[str, Any]], nn.Module]] = {}


def register_source(prefix: str):
    """Register a model source so ``PREFIX:NAME`` strings resolve without an if-chain.

    A source builds ``NAME`` with keyword arguments a checkpoint implies (``num_classes``,
    ``in_chans``); none when there is no checkpoint.
    """

    def deco(fn: Callable[[str, dict[str, Any]], nn.Module]):
        _SOURCES[prefix] = fn
        return fn

    return deco


@register_source("timm")
def _timm(name: str, kw: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ArchnetError(f"unknown timm model {name!r}; see timm.list_models() for names")
    create = functools.partial(timm.create_model, name, pretrained=False)
    return _construct(f"timm model {name!r}", create, kw, "check the name and the class count")


@register_source("zoo")
def _zoo(name: str, kw: dict[str, Any]) -> nn.Module:
    from archnet.zoo import create_model

    return create_model(name, **kw)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` squeezed onto one line, as an error line can hold it."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _construct(what: str, fn: Any, kwargs: dict[str, Any], fix: str) -> nn.Module:
    """Call a model constructor; anything it does wrong becomes one line naming `what`.

    User code raises anything, so the arguments are checked against the signature first (a
    factory that needs arguments is told apart from one that fails inside), and any exception
    of the call itself is reported with its type and message instead of a traceback.
    """
    if not callable(fn):
        raise ArchnetError(
            f"{what} is not callable (its type is {type(fn).__name__}); point it at a function "
            "or class that returns an nn.Module"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C extensions have none: just call
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            required = [
                p.name
                for p in signature.parameters.values()
                if p.default is p.empty and p.kind not in skip and p.name not in kwargs
            ]
            if required:
                raise ArchnetError(
                    f"{what} needs arguments ({', '.join(required)}) that --model cannot pass; "
                    "give them defaults or point --model at a function that takes none"
                ) from None
            given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ArchnetError(
                f"{what} cannot take {given} ({e}); add that parameter so a checkpoint's class "
                "count can be passed"
            ) from None
    try:
        model = fn(**kwargs)
    except ArchnetError:
        raise
    except Exception as e:  # user code: any type
        raise ArchnetError(f"{what} raised {_one_line(e)}; {fix}") from None
    if not isinstance(model, nn.Module):
        raise ArchnetError(f"{what} returned {type(model).__name__}, not a Module")
    return model


def _factory(spec: str, kw: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # ImportError, AttributeError, or whatever the module raises
        raise ArchnetError(
            f"cannot import model factory {spec!r} ({_one_line(e)}); use 'timm:NAME', "
            "'zoo:NAME' or 'package.module:factory' with the package on PYTHONPATH"
        ) from None
    return _construct(f"model factory {spec!r}", fn, kw, "fix the factory so it builds the model")


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


def _layer(model: nn.Module, kind: type[nn.Module], last: bool) -> tuple[str, nn.Module] | None:
    layers = [(n, m) for n, m in model.named_modules() if type(m) is kind]
    return (layers[-1] if last else layers[0]) if layers else None


def _implied_kwargs(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments a checkpoint implies where they differ from the model's defaults:
    the class count (its classifier's rows) and the input channels (its first conv's)."""
    kw: dict[str, Any] = {}
    classifier = (getattr(model, "default_cfg", None) or {}).get("classifier")
    head = (classifier, model.get_submodule(classifier)) if classifier else None
    head = head or _layer(model, nn.Linear, last=True)
    if head and f"{head[0]}.weight" in state:
        n = state[f"{head[0]}.weight"].shape[0]
        if n != head[1].weight.shape[0]:
            kw["num_classes"] = n
    stem = _layer(model, nn.Conv2d, last=False)
    if stem and f"{stem[0]}.weight" in state:
        channels = state[f"{stem[0]}.weight"].shape[1] * stem[1].groups
        if channels != stem[1].in_channels:
            kw["in_chans"] = channels
    return kw


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
    build = (lambda kw: source(name, kw)) if source else (lambda kw: _factory(spec, kw))
    model = build({})
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        implied = _implied_kwargs(model, state)
        if implied:
            model = build(implied)
        load_state(model, state, str(checkpoint))
    return model.eval()
