"""Exact legalization of functional glue: arithmetic written in a module's ``forward`` (a
residual ``x + y``, ``x.chunk(2, 1)``, ``F.pad``, a channel shuffle) that no child layer holds,
so the module-type converters of :mod:`archnet.opconvert` cannot reach it.

Each module outside the blocks is traced with ``torch.fx``, its children as leaves (a module
that does not trace is left as it is; its children are tried on their own), its shapes read
from one forward of an example input. A rule registered for a node's target (a function such
as ``operator.add``, or a method name such as ``"chunk"``) returns a replacement module and
the nodes it reads; the module becomes a ``GraphModule`` calling it (a child ``glue_<node>``),
and is kept only if it computes what it did on the example input. Module types whose exact
replacement depends on the input shape (an average pool exact only on even sizes, a pad conv
that must know its channels) are registered the same way, by class. The built-in rules are
in :mod:`archnet.gluerules`; a ``--plugin`` module registers more with :func:`register_glue`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = [
    "Replacement",
    "Site",
    "alone",
    "glue_owner",
    "legalize_glue",
    "legalize_layers",
    "register_glue",
]

TOL = 1e-4  # relative: a rewrite kept as exact must agree this well on the example input


@dataclass
class Replacement:
    """What a rule puts in a node's place: ``module(*inputs)``, and what the node was."""

    module: nn.Module
    inputs: tuple[fx.Node, ...]
    was: str


NodeRule = Callable[["Site"], "Replacement | None"]
LayerRule = Callable[[nn.Module, tuple[int, ...]], "nn.Module | None"]
_node_rules: dict[Any, NodeRule] = {}
_layer_rules: dict[type, LayerRule] = {}


_approximate: set[Callable] = set()


def register_glue(*keys: Any, exact: bool = True) -> Callable:
    """Decorator registering a rule. A key that is an ``nn.Module`` class registers
    ``rule(module, input_shape) -> nn.Module | None`` for layers of exactly that class; any
    other key (a function, or a method name such as ``"chunk"``) registers
    ``rule(site: Site) -> Replacement | None`` for fx nodes of that target. An ``exact``
    rule's result is dropped where it does not compute what it replaced (on the example
    input); one registered with ``exact=False`` is kept, and the plan calls it approximate."""

    def decorator(rule: Callable) -> Callable:
        for key in keys:
            if isinstance(key, type) and issubclass(key, nn.Module):
                _layer_rules[key] = rule
            else:
                _node_rules[key] = rule
        if not exact:
            _approximate.add(rule)
        return rule

    return decorator


class _Opaque(Exception):
    """A value the site cannot compute from constants and the example's shapes."""


@dataclass
class Site:
    """A node of a traced module, with the shapes and constants its rule may read."""

    node: fx.Node
    module: fx.GraphModule

    def meta(self, arg: Any) -> TensorMetadata | None:
        """The tensor metadata of ``arg`` (a node with one tensor output), else None."""
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        return meta if isinstance(meta, TensorMetadata) else None

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        meta = self.meta(arg)
        return None if meta is None else tuple(meta.shape)

    def image(self, arg: Any) -> tuple[int, int, int, int] | None:
        """``(N, C, H, W)`` of a floating 4-D tensor node, else None."""
        meta = self.meta(arg)
        if meta is None or len(meta.shape) != 4 or not meta.dtype.is_floating_point:
            return None
        return tuple(meta.shape)

    def constant(self, arg: Any) -> torch.Tensor | float | None:
        """``arg``'s value if it depends on no input (a number, a buffer, a parameter and
        what is computed from them), else None."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg)
        if not isinstance(arg, fx.Node) or _depends_on_input(arg):
            return None
        try:
            return self.evaluate(arg, {})
        except _Opaque:
            return None

    def evaluate(self, node: Any, env: dict[fx.Node, Any]) -> Any:
        """``node``'s value given ``env``; other tensors are zeros of their example shape
        (enough for size arithmetic; rules check that no other tensor feeds the data)."""
        if not isinstance(node, fx.Node):
            return node
        if node in env:
            return env[node]

        def value(a):
            return fx.node.map_arg(a, lambda n: self.evaluate(n, env))

        if node.op == "get_attr":
            out = self.module
            for part in node.target.split("."):
                out = getattr(out, part)
            out = out.detach() if isinstance(out, torch.Tensor) else out
        elif node.op == "call_function":
            out = node.target(*value(node.args), **value(node.kwargs))
        elif node.op == "call_method":
            args = value(node.args)
            out = getattr(args[0], node.target)(*args[1:], **value(node.kwargs))
        elif self.meta(node) is not None:
            meta = self.meta(node)
            out = torch.zeros(meta.shape, dtype=torch.float64)
        else:
            raise _Opaque(node.name)
        env[node] = out
        return out


def _depends_on_input(node: fx.Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "call_module"):
            return True
        todo += n.all_input_nodes
    return False


def _rule(node: fx.Node) -> NodeRule | None:
    if node.op in ("call_function", "call_method"):
        try:
            return _node_rules.get(node.target)
        except TypeError:  # an unhashable target
            return None
    return None


def _is_own(module: nn.Module) -> bool:
    """Layers that hold no glue of their own: torch's, and what a conversion built."""
    mod = type(module).__module__
    return mod.startswith(("torch.", "archnet.glue")) or isinstance(module, fx.GraphModule)


class _ChildLeaves(fx.Tracer):
    """Traces a module's own ``forward`` only: every submodule it calls is a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _record(model: nn.Module, example: torch.Tensor) -> dict[str, tuple | None]:
    """The positional tensor inputs of every module in one forward (None: called with
    keywords, with non-tensors, or with different shapes on different calls)."""
    seen: dict[str, tuple | None] = {}

    def hook(name, _m, args, kwargs):
        ok = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
        shapes = [tuple(a.shape) for a in args] if ok else None
        if name in seen and (seen[name] is None or shapes != [tuple(a.shape) for a in seen[name]]):
            seen[name] = None
        elif name not in seen:
            seen[name] = tuple(args) if ok else None

    handles = [
        m.register_forward_pre_hook(lambda m, a, k, n=n: hook(n, m, a, k), with_kwargs=True)
        for n, m in model.named_modules()
    ]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return seen


def _within(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def legalize_layers(
    model: nn.Module, skip: Iterable[str], example: torch.Tensor
) -> list[tuple[str, str, str]]:
    """Replace, in place, every layer with a registered class rule that accepts its input
    shape; one (name, was, now) row each. Runs before :func:`~archnet.opconvert.
    convert_modules`, so an exact rewrite wins over an approximate converter."""
    from archnet.opconvert import describe

    skip = tuple(skip)
    calls = _record(model, example)
    rows = []
    for name, module in list(model.named_modules()):
        rule = _layer_rules.get(type(module))
        args = calls.get(name)
        if not name or rule is None or _within(name, skip) or not args:
            continue
        new = rule(module, tuple(args[0].shape))
        if new is None:
            continue
        was = module.training
        with torch.no_grad():
            new = new.to(args[0].dtype).eval()
            error = _error(module.eval()(*args), new(*args))
        module.train(was)
        if error > TOL and rule not in _approximate:
            continue
        model.set_submodule(name, new.train(was))
        rows.append((name, describe(module), getattr(new, "summary", describe(new))))
    return rows


def _error(old: Any, new: Any) -> float:
    """Max relative difference of two outputs (tensors or tuples of them); inf if unlike."""
    olds = old if isinstance(old, (tuple, list)) else (old,)
    news = new if isinstance(new, (tuple, list)) else (new,)
    if len(olds) != len(news):
        return float("inf")
    worst = 0.0
    for o, n in zip(olds, news):
        if not isinstance(o, torch.Tensor):
            if o != n:
                return float("inf")
            continue
        if not isinstance(n, torch.Tensor) or o.shape != n.shape:
            return float("inf")
        if o.is_floating_point():
            scale = o.abs().max().clamp_min(1e-12) if o.numel() else 1.0
            worst = max(worst, float((n - o).abs().max() / scale) if o.numel() else 0.0)
        elif not torch.equal(o, n):
            return float("inf")
    return worst


def _rewrite(
    module: nn.Module, args: tuple, only: str | None = None
) -> tuple[nn.Module, list[tuple[str, str, str]]]:
    """``module`` with its own glue replaced (only node ``only``, if given), and a row per
    replacement named by the new child; ``module`` itself when nothing applies."""
    from archnet.opconvert import describe

    was = module.training
    try:
        graph = _ChildLeaves().trace(module)
    except Exception:  # noqa: BLE001 - control flow on values, untraceable calls: left as is
        return module, []
    if not any(_rule(n) for n in graph.nodes):
        return module, []
    gm = fx.GraphModule(module, graph, type(module).__name__)
    for name, child in module.named_children():  # the originals, whole, under their names
        setattr(gm, name, child)
    try:
        with torch.no_grad():
            ShapeProp(gm.eval()).propagate(*args)
    except Exception:  # noqa: BLE001
        return module.train(was), []
    done, rows, exact = {}, [], True
    for node in list(gm.graph.nodes):
        rule = _rule(node)
        if rule is None or (only is not None and node.name != only) or not node.users:
            continue
        rep = rule(Site(node, gm))
        if rep is None:
            continue
        child = f"glue_{node.name}"
        gm.add_submodule(child, rep.module.to(args[0].dtype).requires_grad_(False))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(child, rep.inputs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        done[child] = node.name
        exact = exact and rule not in _approximate
        rows.append((child, rep.was, getattr(rep.module, "summary", describe(rep.module))))
    if not done:
        return module.train(was), []
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.archnet_glue = done
    with torch.no_grad():
        if exact and _error(module.eval()(*args), gm.eval()(*args)) > TOL:
            return module.train(was), []
    module.train(was)
    return gm.train(was), rows


def legalize_glue(
    model: nn.Module, skip: Iterable[str], example: torch.Tensor
) -> tuple[nn.Module, list[tuple[str, str, str]]]:
    """``model`` with the glue of every module outside ``skip`` (the blocks) made of layers;
    (name, was, now) rows name each new layer. The root may come back as a new module."""
    skip = tuple(skip)
    calls = _record(model, example)
    rows: list[tuple[str, str, str]] = []

    def visit(name: str, module: nn.Module) -> nn.Module:
        for child_name, child in list(module.named_children()):
            full = _join(name, child_name)
            if not _within(full, skip):
                new = visit(full, child)
                if new is not child:
                    setattr(module, child_name, new)
        if _is_own(module) or not calls.get(name):
            return module
        new, own = _rewrite(module, calls[name])
        rows.extend((_join(name, n), was, now) for n, was, now in own)
        return new

    return visit("", model), rows


def glue_owner(model: nn.Module, name: str) -> tuple[str, str] | None:
    """For a layer :func:`legalize_glue` added: (its module's name, the node it replaced)."""
    parent, _, child = name.rpartition(".")
    try:
        owner = model.get_submodule(parent)
    except AttributeError:
        return None
    node = getattr(owner, "archnet_glue", {}).get(child)
    return None if node is None else (parent, node)


def alone(module: nn.Module, args: tuple, node: str) -> nn.Module:
    """A copy of ``module`` with the glue of ``node`` alone replaced (to judge one row)."""
    return _rewrite(copy.deepcopy(module), args, only=node)[0]


# the built-in rules register themselves on import; at the end, as they use this module
from archnet import gluerules as _gluerules  # noqa: E402, F401
