"""What a conversion will do, known in seconds before any training (``archnet plan``), and the
pre-flight check that refuses a conversion its target cannot take.

The teacher's blocks are found; each block's candidates are filtered by the target; the shell
(stem, head and the glue between blocks) is converted as the student's will be, exported once
with every block stubbed, and checked against the target. Nodes the stubs emit are not the
shell's and are left out; every other violation is what no rewrite handles, named with its
node, op and source module. Every rewrite is compared with the layer it replaced on the input
that layer sees in the teacher: *exact* when the outputs agree to float tolerance, else
*approximate* (distillation trains it back).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.costs import outside_network
from archnet.errors import ArchnetError
from archnet.targets import CheckReport, Target, check_report
from archnet.targets.check import format_unverified, format_violation

__all__ = ["Plan", "Rewrite", "convert_shell", "plan_conversion", "preflight"]

EXACT_TOL = 1e-4  # relative: float rounding of a re-arranged computation, nothing more


@dataclass
class Rewrite:
    """One shell rewrite: the module, what it was, what it became, and how close."""

    module: str
    was: str
    now: str
    exact: bool | None  # None: not comparable alone (an in-place glue edit)
    error: float | None = None  # max |new - old| / max |old| on the teacher's input


@dataclass
class Plan:
    """A conversion's plan: blocks, candidates per block, shell rewrites, what is left."""

    target: str
    mode: str
    blocks: list[BlockSpec]
    candidates: dict[str, int] = field(default_factory=dict)
    rewrites: list[Rewrite] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # one line per node no rewrite handles

    @property
    def ok(self) -> bool:
        return not self.left


def convert_shell(
    teacher: nn.Module,
    specs: list[BlockSpec],
    target: Target,
    mode: str,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[nn.Module, list[tuple[str, str, str]]]:
    """The network the student's blocks go into: the teacher with its stem, head and glue
    converted to ``target``'s operators in Arch-Net mode (as-is in HANT mode). With
    ``input_shape``, shape-dependent exact rewrites run first and the functional glue of
    every module outside the blocks is legalized last (:mod:`archnet.glue`)."""
    from archnet.channelsplit import split_wide_layers

    net = copy.deepcopy(teacher)
    if mode != "archnet":
        return net, []
    names = [s.name for s in specs]
    net, rows = restrict(net, names, input_shape)
    if target.rules.max_channels:
        rows += split_wide_layers(net, target.rules.max_channels, names)
    return net, [tuple(r) for r in rows]


def restrict(
    net: nn.Module, skip: list[str], input_shape: tuple[int, ...] | None
) -> tuple[nn.Module, list]:
    """``net`` (in place, the root possibly new) on the restricted operators outside the
    modules named in ``skip``: with ``input_shape``, shape-dependent exact rewrites first, then
    every layer converted, then the functional glue legalized; (name, was, now) rows."""
    from archnet.glue import legalize_glue, legalize_layers
    from archnet.opconvert import convert_modules

    example = None
    if input_shape is not None:
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(2, *input_shape[1:], generator=gen)  # batch 2: batch-mixing shows
        ref = next(iter(net.parameters()), None)
        example = example if ref is None else example.to(ref.device, ref.dtype)
    rows = [] if example is None else legalize_layers(net, skip, example)
    rows += convert_modules(net, skip)
    if example is not None:
        net, glue_rows = legalize_glue(net, skip, example)
        rows += glue_rows
    return net, rows


def _inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """The positional inputs each named module receives in one forward of ``model``."""
    seen: dict[str, tuple] = {}
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        hook = lambda _m, args, name=name: seen.setdefault(name, args)  # noqa: E731
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _rewritten(teacher: nn.Module, shell: nn.Module, name: str) -> nn.Module:
    """The module as this one rewrite left it: a layer replaced whole is the shell's; a module
    edited in place (whose children may hold other rewrites) is a copy of the teacher's with
    that edit alone, so each row is judged on its own."""
    from archnet.opconvert import get_rewrite

    module = teacher.get_submodule(name)
    edit = get_rewrite(module)
    if edit is None:
        return shell.get_submodule(name)
    alone = copy.deepcopy(module)
    edit(alone)
    return alone


def _compare(teacher: nn.Module, shell: nn.Module, rows, x: torch.Tensor) -> list[Rewrite]:
    """Each row judged alone; a glue layer (:mod:`archnet.glue`) by its module, with that
    one node's glue replaced, against the teacher's module on the module's input."""
    from archnet.glue import alone, glue_owner

    owners = {r[0]: glue_owner(shell, r[0]) for r in rows}
    inputs = _inputs(teacher, [(owners[r[0]] or (r[0],))[0] for r in rows], x)
    out = []
    for name, was, now in rows:
        owner = owners[name]
        at = owner[0] if owner else name
        if at not in inputs:
            out.append(Rewrite(name, was, now, None))
            continue
        args = inputs[at]
        with torch.no_grad():
            old = teacher.get_submodule(at).eval()(*args)
            if owner:
                module = alone(teacher.get_submodule(at), args, owner[1])
            else:
                module = _rewritten(teacher, shell, name)
            new = module.eval()(*args)
        if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)) or (
            old.shape != new.shape
        ):
            out.append(Rewrite(name, was, now, False))
            continue
        error = float((new - old).abs().max() / old.abs().max().clamp_min(1e-12))
        out.append(Rewrite(name, was, now, error <= EXACT_TOL, error))
    return out


Quantize = Callable[[nn.Module, torch.Tensor], nn.Module]


def shell_violations(
    shell: nn.Module,
    specs: list[BlockSpec],
    target: Target,
    shape: tuple[int, ...],
    quantize: Quantize | None = None,
) -> list[str]:
    """One line per node of the shell (blocks stubbed, stub nodes left out) that ``target``
    does not run or could not be verified on; ``quantize(stubbed, calibration)`` quantizes it
    as a quantized student's shell will be (an integer-only target checks its QDQ export)."""
    from archnet.quant.export import export_any

    stubbed = outside_network(shell, specs)
    if quantize is not None:
        x = torch.randn(8, *shape[1:], generator=torch.Generator().manual_seed(0))
        stubbed = quantize(stubbed, x).eval()
    report: CheckReport = check_report(export_any(stubbed, shape), target)
    blocks = [s.name for s in specs]

    def in_block(module: str | None) -> bool:
        return bool(module) and any(module == b or module.startswith(b + ".") for b in blocks)

    lines = [format_violation(v) for v in report.violations if not in_block(v.module)]
    return lines + [format_unverified(u) for u in report.unverified if not in_block(u.module)]


def plan_conversion(
    teacher: nn.Module,
    specs: list[BlockSpec],
    target: Target,
    mode: str,
    input_shape: tuple[int, ...],
    candidates: list[str] | None = None,
    count_candidates: bool = True,
) -> Plan:
    """The plan of converting ``teacher`` (blocks ``specs``) for ``target`` in ``mode``;
    ``candidates``: name patterns (None: all) whose target-accepted count is given per block
    (each candidate exported and checked: the slow part, skipped without
    ``count_candidates``)."""
    from archnet.candidates import build_pool
    from archnet.targets import rejects

    teacher = teacher.eval()
    shell, rows = convert_shell(teacher, specs, target, mode, input_shape)
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    plan = Plan(target.name, mode, list(specs))
    plan.rewrites = _compare(teacher, shell, rows, x)
    plan.left = shell_violations(shell, specs, target, input_shape, _int8(target, specs))
    for spec in specs if count_candidates else []:
        pool = build_pool(spec, teacher.get_submodule(spec.name), candidates or ["*"])
        shape = (1, *spec.in_shape)
        plan.candidates[spec.name] = sum(
            name != "teacher" and rejects(target, m, shape) is None for name, m in pool.items()
        )
    return plan


def _int8(target: Target, specs: list[BlockSpec]) -> Quantize | None:
    """For an integer-only target, the shell quantized at W8A8 (a plan has no --bits), its
    block stubs kept as calls."""
    if not target.rules.quantized_only:
        return None
    from archnet.quant import QuantConfig, prepare_qat

    keep = tuple(s.name for s in specs)
    cfg = QuantConfig(8, 8, (8, 8), requantize=target.requantize)
    return lambda m, x: prepare_qat(m, cfg, x, keep=keep)


def preflight(
    shell: nn.Module,
    specs: list[BlockSpec],
    target: Target,
    shape: tuple[int, ...],
    quantize: Quantize | None = None,
) -> None:
    """Refuse, in seconds and before any training, a shell that ``target`` cannot run."""
    left = shell_violations(shell, specs, target, shape, quantize)
    if left:
        raise ArchnetError(
            f"{len(left)} node(s) outside the blocks cannot run on target {target.name} after "
            f"every rewrite archnet knows: {'; '.join(left[:4])}"
            + (f" (and {len(left) - 4} more)" if len(left) > 4 else "")
            + ". Make them part of a block with --blocks, choose a looser target, or register "
            "a converter (archnet.opconvert.register_converter); `archnet plan` lists them all"
        )
