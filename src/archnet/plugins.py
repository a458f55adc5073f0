"""User plugins: modules imported before a conversion so that what they register (a converter
for a module type with :func:`archnet.opconvert.register_converter`, a glue rewrite with
:func:`~archnet.opconvert.register_rewrite`, a candidate, a task, a latency backend) is used
exactly like the built-in ones, without editing the package. A run stores their names and
imports them again on ``--resume``, ``search`` and ``export``."""

from __future__ import annotations

import importlib

from archnet.errors import ArchnetError

__all__ = ["load_plugins"]


def load_plugins(spec: str | None) -> list[str]:
    """Import every module named in ``spec`` (comma-separated); the names imported."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ArchnetError(
                f"--plugin {name} cannot be imported ({e}); put its folder on PYTHONPATH"
            ) from None
    return names
