"""The generic block rule, for models no family pattern fits: the deepest containers whose
children run in sequence, each mapping one tensor to the next (found by tracing, since a
module's ``forward`` may call its children in any order, or not at all).

Such a container's children are the blocks. A plain stack (VGG's ``features``: convs,
activations and pools in one ``nn.Sequential``) has only single layers as children; its layers
are grouped in place into :class:`LayerGroup` runs, each ending at a pool, so that every block
is still one named module: hooks, swapping by name and export need nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from archnet.errors import ArchnetError

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
_CONVS = (nn.Conv1d, nn.Conv2d)
_LAYERS = (*_CONVS, nn.Linear)  # a container with one of these as a child is a block, not a stage


class LayerGroup(nn.Sequential):
    """Consecutive layers of a plain stack made one module; ``first`` is the index its first
    layer had in the stack, so the teacher's original parameter names can be told
    (:func:`ungrouped_state`)."""

    def __init__(self, first: int, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.first = first


def forward_failed(e: Exception, example: torch.Tensor) -> ArchnetError:
    """The error of a model that fails on the example input: the input size is the usual cause."""
    return ArchnetError(
        f"the model fails on an input of shape {tuple(example.shape)} ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:200]}); pass --input-size C,H,W the model accepts"
    )


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _computes(module: nn.Module) -> bool:
    """A block candidate: layers that hold a conv or a linear layer (a lone norm is glue)."""
    return not _is_leaf(module) and any(isinstance(m, _LAYERS) for m in module.modules())


def _is_leaf(module: nn.Module) -> bool:
    return not any(True for _ in module.children())


def plain_runs(stack: nn.Sequential) -> list[list[int]]:
    """Indices of ``stack``'s layers cut into runs, each ending at a pool (VGG's stages), or,
    with fewer than two pools, each starting at a conv; a run without weights joins the one
    before it. Fewer than two runs: not a plain stack worth cutting."""
    layers = list(stack)
    if len(layers) < 2 or not all(_is_leaf(m) for m in layers):
        return []
    if sum(isinstance(m, _CONVS) for m in layers) < 2:
        return []
    pools = sum(isinstance(m, _POOLS) for m in layers) >= 2
    runs: list[list[int]] = [[]]
    for i, m in enumerate(layers):
        if not pools and isinstance(m, _CONVS) and runs[-1]:
            runs.append([])
        runs[-1].append(i)
        if pools and isinstance(m, _POOLS):
            runs.append([])
    merged: list[list[int]] = []
    for run in runs:
        if merged and not any(_has_params(layers[i]) for i in run):
            merged[-1] += run
        elif run:
            merged.append(run)
    return merged if len(merged) >= 2 else []


def group_stack(stack: nn.Sequential, runs: list[list[int]]) -> None:
    """Regroup ``stack`` in place: child ``k`` becomes the ``LayerGroup`` of ``runs[k]``. The
    forward computes exactly what it did."""
    layers = list(stack)
    groups = [LayerGroup(run[0], *(layers[i] for i in run)) for run in runs]
    for key in list(stack._modules):
        del stack._modules[key]
    for k, g in enumerate(groups):
        stack.add_module(str(k), g)


def has_groups(model: nn.Module) -> bool:
    return any(isinstance(m, LayerGroup) for m in model.modules())


def ungrouped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under the names it had before any plain stack was grouped, so a
    run's fingerprint is the same for the teacher as given and as stored."""
    groups = {n: m for n, m in model.named_modules() if isinstance(m, LayerGroup)}
    state = {}
    for key, tensor in model.state_dict().items():
        group = next((g for g in groups if key.startswith(g + ".")), None)
        if group is not None:
            parent = group.rpartition(".")[0]
            index, _, rest = key[len(group) + 1 :].partition(".")
            key = ".".join(p for p in (parent, str(groups[group].first + int(index)), rest) if p)
        state[key] = tensor
    return state


@dataclass
class _Run:
    calls: int = 0
    order: int = -1
    x: object = None  # the stream tensor in (the object itself: identity is what chains)
    y: object = None
    kids: list[str] = field(default_factory=list)


def _trace(model: nn.Module, example: torch.Tensor) -> dict[str, _Run]:
    """Every module's calls in one forward: how often, in what order, its tensor in and out."""
    runs: dict[str, _Run] = {}
    counter = iter(range(1 << 30))

    def pre(name: str):
        def fn(_m, args, kwargs):
            run = runs[name]
            run.calls += 1
            run.order = next(counter)
            one = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            run.x = args[0] if one else None

        return fn

    def post(name: str):
        def fn(_m, _args, _kwargs, out):
            runs[name].y = out if isinstance(out, torch.Tensor) else None

        return fn

    handles = []
    for name, module in model.named_modules():
        runs[name] = _Run(kids=[f"{name}.{k}" if name else k for k, _ in module.named_children()])
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post(name), with_kwargs=True))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:  # the user's model: any type
        raise forward_failed(e, example) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return runs


def _chains(runs: dict[str, _Run], name: str, params: dict[str, bool]) -> bool:
    """Whether module ``name`` ran once, tensor to tensor, through its children in sequence:
    the first child reads its input, each next child the previous one's output, the last one's
    output is its own; every child with weights runs once."""
    me = runs[name]
    if me.calls != 1 or me.x is None or me.y is None or not me.kids:
        return False
    if any(params[k] and runs[k].calls != 1 for k in me.kids):
        return False
    ran = sorted((k for k in me.kids if runs[k].calls), key=lambda k: runs[k].order)
    if not ran or any(runs[k].calls != 1 or runs[k].y is None for k in ran):
        return False
    feeds = [me.x] + [runs[k].y for k in ran]
    return all(runs[k].x is feeds[i] for i, k in enumerate(ran)) and feeds[-1] is me.y


def chained_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The generic rule's blocks: the children (with a conv or linear layer) of the deepest
    containers that chain two or more of them and no bare conv or linear layer, a plain stack's
    layers grouped first (which changes ``model``: see :func:`group_stack`)."""
    runs = _trace(model, example)
    modules = dict(model.named_modules())
    params = {n: _has_params(m) for n, m in modules.items()}
    picked: dict[str, list[list[int]] | None] = {}  # container -> plain runs (to group), or None
    for name, module in modules.items():
        if not params[name] or isinstance(module, LayerGroup) or not _chains(runs, name, params):
            continue
        weighted = [modules[k] for k in runs[name].kids if params[k]]
        composite = [k for k in runs[name].kids if _computes(modules[k])]
        if weighted and all(isinstance(m, LayerGroup) for m in weighted):
            picked[name] = []  # a plain stack grouped before (a stored teacher)
        elif len(composite) >= 2 and not any(isinstance(m, _LAYERS) for m in weighted):
            picked[name] = None
        elif isinstance(module, nn.Sequential) and (cut := plain_runs(module)):
            picked[name] = cut
    # the deepest: a container holding another picked one gives way to it
    deepest = [n for n in picked if not any(o.startswith(n + ".") or (not n and o) for o in picked)]
    names = []
    for name in deepest:
        if picked[name] is not None:
            if picked[name]:
                group_stack(modules[name], picked[name])
            names += [f"{name}.{k}" if name else k for k, _ in modules[name].named_children()]
            names += _feature_successors(runs, modules, name)
        else:
            names += [k for k in runs[name].kids if _computes(modules[k])]
    return names


def _feature_successors(runs: dict[str, _Run], modules: dict[str, nn.Module], stack: str) -> list:
    """The links after a plain stack in its parent's chain that still compute feature maps
    (VGG's ``pre_logits``, a conv MLP): blocks too, up to the first that does not."""
    parent = stack.rpartition(".")[0]
    if not stack or not _chains(runs, parent, {n: _has_params(m) for n, m in modules.items()}):
        return []
    ran = sorted((k for k in runs[parent].kids if runs[k].calls), key=lambda k: runs[k].order)
    dims = runs[stack].y.dim()
    after = []
    for k in ran[ran.index(stack) + 1 :]:
        if not _computes(modules[k]) or runs[k].y.dim() != dims:
            break
        after.append(k)
    return after
