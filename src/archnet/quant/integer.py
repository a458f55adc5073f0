"""Integer-friendly quantization points: each tensor quantized once, where it is produced.

Quantizing only layer inputs leaves a QDQ graph that runtimes cannot fuse: a residual ``Add``
sums float convolution outputs, a tensor read by two layers gets two QuantizeLinear nodes
with different scales, and onnxruntime keeps those convolutions in float behind
DequantizeLinear. An integer chip requantizes every accumulator instead: after each
convolution (and the ReLU fused into it), each residual add, concat and average pool. This
pass puts LSQ quantizers exactly there, in the training graph, so that what is trained is what
is exported:

* the output of every quantized layer, add/sub/mul of two tensors, concat, average pool and
  sigmoid is quantized once, after a ReLU that directly follows it (``DQ -> Conv -> Relu ->
  Q`` is one ``QLinearConv``), by a new quantizer named ``requant_N``; a SiLU is written
  ``x * sigmoid(x)`` so that both parts are;
* a block's input, when a quantized layer reads it, is quantized once for all its readers;
* a quantized layer whose input is already on a grid of its own bit width reads it as it is:
  its input quantizer becomes ``OnGrid`` (the identity, with that grid's step for its bias).

``torch.fx`` finds the points; a module that does not trace is handled child by child. Across
modules quantized apart (the student's blocks), ``share_quantizers`` turns a quantizer that
re-quantizes another's output at the same width into an ``OnGrid`` of it, from one forward:
one Q/DQ pair per block boundary.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from archnet.quant.lsq import LSQQuantizer
from archnet.quant.modules import QuantModule

__all__ = ["OnGrid", "RequantPoint", "integer_points", "share_quantizers"]

# set on a module this pass handled: a later pass over a model that holds it (the student
# around its blocks) keeps it as one call
DONE = "_requantized"
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6}
# Ops whose output an integer chip requantizes, by FX target: two-tensor arithmetic, and (below)
# concat, average pooling (a ``mean`` only over the spatial axes) and sigmoids
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}
_BINARY_METHODS = {"add", "add_", "sub", "mul"}
_REQUANT_FUNCTIONS = {
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    torch.cat,
    torch.concat,
    # a gate, or half of a SiLU: integer kernels and chips run it as a table on the grid
    torch.sigmoid,
    F.sigmoid,
}
_REQUANT_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Sigmoid)
_SILU = (nn.SiLU,)
# Ops that keep a tensor on its grid: its values stay grid points of the same step.
_GRID_KEEPING_MODULES = (nn.MaxPool2d, nn.Identity, nn.Flatten, nn.Dropout, *_RELU_MODULES)
_GRID_KEEPING_FUNCTIONS = {F.max_pool2d, torch.flatten, *_RELU_FUNCTIONS}
_GRID_KEEPING_METHODS = {"flatten", "reshape", "view", "permute", "contiguous", "relu"}


class RequantPoint(LSQQuantizer):
    """A quantizer this pass added (not a layer's own): the float twin drops it."""


class OnGrid(nn.Module):
    """A layer's input quantizer where its input is already on ``grid``: the identity, with
    ``grid``'s step for the bias grid. ``grid`` is held, not registered, so it stays the child
    of the graph that applies it (a traced module names each call by its first path)."""

    def __init__(self, grid: LSQQuantizer) -> None:
        super().__init__()
        object.__setattr__(self, "grid", grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __getattr__(self, name: str):
        if name == "step":  # for the bias grid, which takes no gradient from it; detached, it
            return self.__dict__["grid"].step.data  # exports where its grid is cut away
        if name in ("enabled", "initialized", "bits", "signed", "zero_point_value"):
            return getattr(self.__dict__["grid"], name)
        return super().__getattr__(name)


class _Tracer(fx.Tracer):
    """Quantized layers, quantizers and modules the caller names stay calls."""

    def __init__(self, leaf: Callable[[nn.Module], bool] = lambda m: False) -> None:
        super().__init__()  # constructible bare: unpickling a traced module traces it again
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_leaf(m, self.leaf) or super().is_leaf_module(m, qualname)


def _is_leaf(m: nn.Module, leaf: Callable[[nn.Module], bool]) -> bool:
    return isinstance(m, (QuantModule, LSQQuantizer)) or getattr(m, DONE, False) or leaf(m)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (
        isinstance(_module(gm, node), _RELU_MODULES)
        or (node.op == "call_function" and node.target in _RELU_FUNCTIONS)
        or (node.op == "call_method" and node.target == "relu")
    )


def _passes_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ReLU, or a module that is the identity at inference (a folded batch norm, dropout)."""
    return _is_relu(gm, node) or isinstance(_module(gm, node), (nn.Identity, nn.Dropout))


def _tensors(node: fx.Node) -> list[fx.Node]:
    """The computed tensor inputs of ``node`` (a concat's list flattened): not parameters or
    buffers, which are constants to a runtime (a scale, a bias), not activations."""
    args = node.args[0] if node.target in (torch.cat, torch.concat) else node.args
    return [a for a in args if isinstance(a, fx.Node) and a.op != "get_attr" and _is_tensor(a)]


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def _requantizes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether an integer chip requantizes ``node``'s output."""
    module = _module(gm, node)
    if isinstance(module, (QuantModule, *_REQUANT_MODULES)):
        return True
    if node.op == "call_function" and node.target in _REQUANT_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return tuple(dims or ()) in ((2, 3), (-2, -1))
    binary = (node.op == "call_function" and node.target in _BINARY) or (
        node.op == "call_method" and node.target in _BINARY_METHODS
    )
    return binary and len(_tensors(node)) == 2


def _keeps_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (
        isinstance(_module(gm, node), _GRID_KEEPING_MODULES)
        or (node.op == "call_function" and node.target in _GRID_KEEPING_FUNCTIONS)
        or (node.op == "call_method" and node.target in _GRID_KEEPING_METHODS)
    )


class _Pass:
    def __init__(self, gm: fx.GraphModule, bits: int, quantize_output: bool) -> None:
        self.gm, self.bits, self.quantize_output = gm, bits, quantize_output
        self.count = 0

    def quantizer_of(self, node: fx.Node) -> LSQQuantizer | None:
        """The activation quantizer whose grid ``node``'s values lie on, if any."""
        while True:
            module = _module(self.gm, node)
            if isinstance(module, LSQQuantizer):
                return module
            if not _keeps_grid(self.gm, node) or not node.args:
                return None
            node = node.args[0]
            if not isinstance(node, fx.Node):
                return None

    def on_grid(self, node: fx.Node, bits: int) -> None:
        """Make ``node``'s readers read it from a quantizer: a new one, or (a max-pool of a
        quantized tensor) its grid's quantizer once more, the identity on those values, so the
        runtime sees ``DQ -> MaxPool -> Q`` at one scale and keeps it integer."""
        grid = self.quantizer_of(node)
        if grid is None:
            self.quantize_after(node, bits)
        elif not isinstance(_module(self.gm, node), LSQQuantizer):
            name = next(n for n, m in self.gm.named_modules() if m is grid)
            self.insert(node, name)

    def insert(self, node: fx.Node, name: str) -> None:
        """Call quantizer ``name`` on ``node``'s output, for all of ``node``'s readers."""
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node,))
        new.meta = dict(node.meta)  # same shape: later rules read it
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)

    def quantize_after(self, node: fx.Node, bits: int) -> None:
        """Quantize ``node``'s output for all its users, after the ReLU and no-ops (folded
        batch norms, dropout) that alone read it: the ReLU fuses into the producer."""
        users = list(node.users)
        while len(users) == 1 and _passes_through(self.gm, users[0]):
            node = users[0]
            users = list(node.users)
        if any(isinstance(_module(self.gm, u), LSQQuantizer) for u in users):
            return  # quantized already (the pass run twice, or a quantizer written by hand)
        if not self.quantize_output and any(u.op == "output" for u in users):
            return
        readers = [m.act_bits for u in users if isinstance(m := _module(self.gm, u), QuantModule)]
        bits = min(readers, default=bits)  # requantized to the width its layers read
        while hasattr(self.gm, f"requant_{self.count}"):
            self.count += 1
        name = f"requant_{self.count}"
        self.gm.add_submodule(name, RequantPoint(bits, signed=True, infer_sign=True))
        self.insert(node, name)

    def expand_silu(self) -> None:
        """``silu(x)`` as ``x * sigmoid(x)``, so the sigmoid and the product are each
        requantized (onnxruntime: QLinearSigmoid and QLinearMul, not float)."""
        graph = self.gm.graph
        for node in list(graph.nodes):
            silu = isinstance(_module(self.gm, node), _SILU) or (
                node.op == "call_function" and node.target is F.silu
            )
            if not silu:
                continue
            x = node.args[0]
            with graph.inserting_after(node):
                gate = graph.call_function(torch.sigmoid, (x,))
            with graph.inserting_after(gate):
                out = graph.call_function(operator.mul, (x, gate))
            gate.meta, out.meta = dict(node.meta), dict(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def run(self) -> None:
        self.expand_silu()
        graph = self.gm.graph
        for node in list(graph.nodes):
            if node.op == "placeholder" and _is_tensor(node):
                readers = [u for u in node.users if isinstance(_module(self.gm, u), QuantModule)]
                if readers:
                    self.quantize_after(node, _module(self.gm, readers[0]).act_bits)
        for node in list(graph.nodes):
            if not _requantizes(self.gm, node):
                continue
            module = _module(self.gm, node)
            bits = module.act_bits if isinstance(module, QuantModule) else self.bits
            for arg in _tensors(node) if module is None else []:
                self.on_grid(arg, bits)
            self.quantize_after(node, bits)
        for node in list(graph.nodes):
            module = _module(self.gm, node)
            if isinstance(module, QuantModule) and node.args:
                grid = self.quantizer_of(node.args[0])
                if grid is not None and grid.bits == module.act_bits:
                    self.on_grid(node.args[0], grid.bits)
                    module.act_quant = OnGrid(grid)
        graph.lint()
        self.gm.recompile()


def integer_points(
    model: nn.Module,
    example: torch.Tensor,
    bits: int,
    *,
    quantize_output: bool = True,
    leaf: Callable[[nn.Module], bool] = lambda m: False,
) -> nn.Module:
    """``model`` with the quantization points of an integer chip (see the module docstring);
    ``bits``: the width of points no quantized layer decides (adds, concats, pools).
    ``quantize_output`` also quantizes the model's output (a block's: the next block reads it
    on that grid); ``leaf(m)`` keeps a module as one call. Returns the traced module, or
    ``model`` with its children handled one by one where it does not trace."""
    if getattr(model, DONE, False):
        return model
    try:
        gm = fx.GraphModule(model, _Tracer(leaf).trace(model), type(model).__name__)
    except Exception:  # noqa: BLE001 - control flow FX cannot trace: go one level down
        return _by_child(model, example, bits, leaf)
    try:
        fx.passes.shape_prop.ShapeProp(gm).propagate(example)
    except Exception:  # noqa: BLE001 - e.g. a forward that needs more than one input
        return _by_child(model, example, bits, leaf)
    _Pass(gm, bits, quantize_output).run()
    gm.train(model.training)
    setattr(gm, DONE, True)
    return gm


def _by_child(model: nn.Module, example: torch.Tensor, bits: int, leaf) -> nn.Module:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        child.register_forward_pre_hook(
            lambda _m, args, n=name: inputs.setdefault(n, args[0]) if args else None
        )
        for name, child in model.named_children()
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    for name, child in list(model.named_children()):
        x = inputs.get(name)
        if isinstance(x, torch.Tensor) and not _is_leaf(child, leaf):
            setattr(model, name, integer_points(child, x, bits, leaf=leaf))
    setattr(model, DONE, True)
    return model


@torch.no_grad()
def share_quantizers(model: nn.Module, example: torch.Tensor) -> int:
    """Make each activation quantizer whose input is another quantizer's output at the same
    width an ``OnGrid`` of that quantizer (one forward over ``example`` tells which): one
    Q/DQ pair per block boundary. Not the quantizer itself: a traced module names each call
    by the module's first path, and a call into another block breaks when that block is
    swapped or stubbed. Returns how many."""
    # a quantizer's output by id and version (an in-place op after it keeps the id, not the
    # values); outputs stay alive, so ids stay unique during the forward
    made: dict[tuple[int, int], LSQQuantizer] = {}
    replace: dict[int, LSQQuantizer] = {}
    keep: list[torch.Tensor] = []

    def hook(q: LSQQuantizer, args, out) -> None:
        src = made.get((id(args[0]), args[0]._version))
        if src is not None and src is not q and src.bits == q.bits and id(q) not in replace:
            replace[id(q)] = src
        made[id(out), out._version] = q
        keep.append(out)

    quantizers = {id(m): m for m in model.modules() if isinstance(m, LSQQuantizer)}
    activation = {id(m) for m in quantizers.values()} - {
        id(m.weight_quant) for m in model.modules() if isinstance(m, QuantModule)
    }
    hooks = [quantizers[i].register_forward_hook(hook) for i in activation]
    was_training = model.training
    try:
        model.eval()(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    def root(q: LSQQuantizer) -> LSQQuantizer:
        while id(q) in replace:
            q = replace[id(q)]
        return q

    for module in model.modules():
        if isinstance(module, OnGrid) and id(module.grid) in replace:
            object.__setattr__(module, "grid", root(module.grid))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in replace:  # its input arrives quantized: it becomes the identity
                setattr(parent, name, OnGrid(root(child)))
    return len(replace)
