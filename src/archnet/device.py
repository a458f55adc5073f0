"""Where tensors live: ``--device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) and mixed
precision. Every training and scoring loop asks here, so a run is moved by one option, and on
the CPU nothing changes (autocast is off there unless asked for)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from archnet.errors import ArchnetError

__all__ = ["autocast", "resolve_device", "to_device"]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None): CUDA when present, else the CPU; a CUDA device that this machine
    lacks is an error naming what it has."""
    name = str(name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ArchnetError(f"--device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ArchnetError(
                f"--device {name}: this machine has {count} CUDA device(s); "
                "use --device cpu or auto"
            )
    elif device.type != "cpu":
        raise ArchnetError(f"--device {name!r}: use cpu, cuda, cuda:N or auto")
    return device


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested in dicts, lists, tuples) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool) -> Iterator[None]:
    """Mixed precision on ``device`` when ``enabled`` (bfloat16 on the CPU, float16 on CUDA;
    the weights and optimizer stay float32)."""
    device = torch.device(device)
    if not enabled:
        yield
        return
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.autocast(device.type, dtype=dtype):
        yield
