"""Registry of candidate operations that can replace a teacher block.

Each candidate is a *builder*: given a block's shapes it returns a fresh module mapping
``(B, *in_shape)`` to ``(B, *out_shape)``, or ``None`` when it cannot (e.g. the block does not
down-sample by an integer factor). Names are the stable handle used in configs, logs and
saved architectures, so they never change meaning once registered.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from archnet.blocks import LAYOUTS, BlockSpec
from archnet.context import ContextFree
from archnet.errors import ArchnetError

from ._layers import ChannelsLast
from .inherit import inherit_weights

__all__ = [
    "TEACHER",
    "CandidateDef",
    "Builder",
    "register_candidate",
    "list_candidates",
    "get_candidate",
    "build_candidate",
    "build_pool",
]

# builder(spec) -> module, or builder(spec, teacher_block) for candidates cut from the teacher
Builder = Callable[..., "nn.Module | None"]

#: What a family serves unless it says otherwise: NCHW feature maps. An NCHW family also
#: serves channels-last (NHWC) blocks, built for the transposed shapes and wrapped in permutes.
DEFAULT_LAYOUTS = frozenset({"nchw"})

#: Pool key of the teacher block itself; reserved, never a registered candidate.
TEACHER = "teacher"


@dataclass(frozen=True)
class CandidateDef:
    """One registered candidate kind."""

    name: str
    family: str
    builder: Builder
    tags: frozenset[str]
    layouts: frozenset[str] = DEFAULT_LAYOUTS
    # built from the teacher block itself (``builder(spec, teacher)``), not from shapes alone
    from_teacher: bool = False


_candidates: dict[str, CandidateDef] = {}  # insertion order == registration order


def register_candidate(
    name: str,
    family: str,
    tags: Iterable[str] = (),
    layouts: Iterable[str] = DEFAULT_LAYOUTS,
    from_teacher: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(spec) -> nn.Module | None`` under ``name``, serving
    blocks whose stream has one of ``layouts`` (see ``archnet.blocks.LAYOUTS``). With
    ``from_teacher`` it is ``builder(spec, teacher_block)``: the candidate is cut from the
    teacher's block (fewer heads of its attention), so there is none without the teacher.

    The builder is returned unchanged so one function can be registered under several
    names (e.g. via ``functools.partial``).
    """

    def decorator(builder: Builder) -> Builder:
        if name == TEACHER:
            raise ArchnetError(f"candidate name {TEACHER!r} is reserved for the teacher block")
        if name in _candidates:
            raise ArchnetError(f"candidate {name!r} is already registered")
        unknown = set(layouts) - set(LAYOUTS)
        if unknown:
            raise ArchnetError(f"candidate {name!r}: unknown layouts {sorted(unknown)}")
        _candidates[name] = CandidateDef(
            name, family, builder, frozenset(tags), frozenset(layouts), from_teacher
        )
        return builder

    return decorator


def _as_list(patterns: str | Sequence[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def list_candidates(
    patterns: str | Sequence[str] = "*",
    *,
    exclude: str | Sequence[str] = (),
    tags: Iterable[str] = (),
) -> list[str]:
    """Registered names matching any fnmatch pattern, in registration order.

    A pattern that matches nothing is almost always a typo, so it raises rather than
    silently shrinking the search space. ``exclude`` patterns drop names (matching nothing
    is fine there); ``tags`` keeps only candidates carrying all of them.
    """
    names = list(_candidates)
    selected: set[str] = set()
    for pattern in _as_list(patterns):
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ArchnetError(
                f"candidate pattern {pattern!r} matches nothing; see list_candidates() for names"
            )
        selected.update(hits)
    excluded = {n for p in _as_list(exclude) for n in fnmatch.filter(names, p)}
    required = frozenset(tags)
    return [
        n for n in names if n in selected and n not in excluded and required <= _candidates[n].tags
    ]


def get_candidate(name: str) -> CandidateDef:
    """Look up a registered candidate; unknown names suggest the closest registered ones."""
    try:
        return _candidates[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_candidates), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see list_candidates() for names"
        raise ArchnetError(f"unknown candidate {name!r}; {hint}") from None


def build_candidate(
    name: str, spec: BlockSpec, teacher_block: nn.Module | None = None
) -> nn.Module | None:
    """Build candidate ``name`` for ``spec``; ``None`` when it does not apply to this block.

    With ``teacher_block`` the student starts from the teacher's weights (see
    :func:`inherit_weights`) and lives on the teacher's device and dtype. The reserved name
    ``"teacher"`` is a deep copy of ``teacher_block`` itself.
    """
    if name == TEACHER:
        if teacher_block is None:
            raise ArchnetError("candidate 'teacher' needs the teacher block to copy")
        return copy.deepcopy(teacher_block)
    candidate = get_candidate(name)
    if candidate.from_teacher:
        served = teacher_block is not None and spec.layout in candidate.layouts
        module = candidate.builder(spec, teacher_block) if served else None
    else:
        module = _build_for_layout(candidate, spec)
    if module is None:
        return None
    if teacher_block is not None and not candidate.from_teacher:
        ref = next(iter(teacher_block.parameters()), None)
        if ref is not None:
            dtype = ref.dtype if ref.is_floating_point() else None
            module = module.to(device=ref.device, dtype=dtype)
        inherit_weights(module, teacher_block)
    if spec.context or spec.out_arity:  # its callers pass masks or expect a tuple
        module = ContextFree(module, spec.out_arity)
    return module


def _build_for_layout(candidate: CandidateDef, spec: BlockSpec) -> nn.Module | None:
    """The candidate's module for ``spec``'s layout; None when its family does not serve it."""
    if spec.layout in candidate.layouts:
        return candidate.builder(spec)
    if spec.layout == "nhwc" and "nchw" in candidate.layouts:
        inner = candidate.builder(spec.channels_first())
        return None if inner is None else ChannelsLast(inner)
    return None


def build_pool(
    spec: BlockSpec, teacher_block: nn.Module, patterns: str | Sequence[str] = "*"
) -> dict[str, nn.Module]:
    """All applicable candidates for one block, keyed by name, with ``"teacher"`` first.

    The teacher entry is a deep copy, so training the pool never touches the real teacher.
    A ``"teacher"`` pattern is accepted and ignored since the teacher is always included.
    """
    pool: dict[str, nn.Module] = {TEACHER: copy.deepcopy(teacher_block)}
    wanted = [p for p in _as_list(patterns) if p != TEACHER]
    for name in list_candidates(wanted) if wanted else []:
        module = build_candidate(name, spec, teacher_block)
        if module is not None:
            pool[name] = module
    return pool
