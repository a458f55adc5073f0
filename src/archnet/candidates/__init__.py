"""Candidate operations for replacing teacher blocks, and the registry that names them.

Importing this package registers every built-in family.
"""

from . import archnet, dwsep, fused, kept, mbconv, resnet, skip, transformer  # noqa: F401  (registers on import)
from ._registry import (
    TEACHER,
    Builder,
    CandidateDef,
    build_candidate,
    build_pool,
    get_candidate,
    list_candidates,
    register_candidate,
)
from .inherit import inherit_weights

__all__ = [
    "TEACHER",
    "Builder",
    "CandidateDef",
    "build_candidate",
    "build_pool",
    "get_candidate",
    "inherit_weights",
    "list_candidates",
    "register_candidate",
]
