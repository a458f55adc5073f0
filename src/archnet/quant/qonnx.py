"""QONNX export of a fake-quantized model, its check with qonnx's own executor, and its
bit-operation cost.

QONNX (the format of FINN-style FPGA and integer-chip tool chains) writes each quantizer as one
``Quant`` node carrying the bit width: ``y = (round(clip(x / scale + zeropt)) - zeropt) *
scale`` on the grid of ``bitwidth`` bits (``signed``, ``narrow``). archnet's quantizers are
exactly that (``round(clamp(x / s, qmin, qmax)) * s``, an unsigned grid shifted by an integer
zero point), so the export rewrites each quantizer placeholder into a ``Quant`` node: weights
stay float initializers feeding their ``Quant`` (per output channel scales), activations are
quantized where they were in training. Nothing else changes: the graph computes what the
PyTorch model computes.

``bit_operations`` reads qonnx's inference-cost analysis (multiply-accumulates weighted by
weight bits x activation bits, and the weight and activation bits moved): an *estimate* of what
an integer-only chip does, not a measurement.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from archnet.errors import ArchnetError
from archnet.onnx_utils import INPUT_NAME, stamp_exporter
from archnet.quant.export import (
    PlaceholderRewriter,
    _attr,
    _quantized_tensors,
    export_rewritten,
)
from archnet.quant.lsq import MIN_STEP

__all__ = ["QONNX_DOMAIN", "bit_operations", "export_qonnx", "qonnx_outputs", "write_qonnx"]

QONNX_DOMAIN = "qonnx.custom_op.general"


def _qonnx():
    try:
        import qonnx  # noqa: F401
    except ImportError:
        raise ArchnetError("QONNX needs the qonnx package: pip install 'archnet[qonnx]'") from None


class _QuantRewriter(PlaceholderRewriter):
    """Replaces each quantizer placeholder with a QONNX ``Quant`` node."""

    def _const(self, name: str, value: np.ndarray) -> str:
        self.new_init.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def rewrite(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        index = _attr(node, "id")
        entry = self.tensors[index]
        quant = entry.quantizer
        prefix = self.prefix("quant", index)
        step = quant.step.detach().float().clamp_min(MIN_STEP).cpu().numpy().reshape(-1)
        if entry.weight is not None:
            w = entry.weight.detach().float().cpu().numpy()
            source = self._const(f"{entry.name}_float", w)
            shape = [1] * w.ndim
            if step.size > 1:
                shape[_attr(node, "axis")] = -1
            scale = step.reshape(shape)
        else:
            source, scale = node.input[0], np.array(step[0], np.float32)
        zero = quant.zero_point_value
        inputs = [
            source,
            self._const(f"{prefix}_scale", scale),
            self._const(f"{prefix}_zeropt", np.array(zero, np.float32)),
            self._const(f"{prefix}_bitwidth", np.array(quant.bits, np.float32)),
        ]
        self.report.append(
            {
                "name": entry.name,
                "kind": "weight" if entry.weight is not None else "activation",
                "bits": quant.bits,
                "signed": quant.signed,
                "zero_point": zero,
                "per_channel": step.size > 1,
            }
        )
        quant_node = helper.make_node(
            "Quant",
            inputs,
            [node.output[0]],
            name=prefix,
            domain=QONNX_DOMAIN,
            signed=int(quant.signed),
            narrow=0,
            rounding_mode="ROUND",
        )
        return [quant_node]


def export_qonnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path | None = None,
    exporter: str | None = None,
) -> onnx.ModelProto:
    """QONNX of a fake-quantized ``model`` at ``input_shape`` (see the module docstring)."""
    tensors = _quantized_tensors(model)
    if not tensors:
        raise ArchnetError("QONNX export needs a quantized model (train one with --bits)")
    exported, tag = export_rewritten(
        model, _QuantRewriter(tensors), input_shape, exporter, None, None
    )
    exported.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    stamp_exporter(exported, tag)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(exported, str(path))
    return exported


def _wrapper(proto: onnx.ModelProto):
    _qonnx()
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    return ModelWrapper(onnx.ModelProto.FromString(proto.SerializeToString())).transform(
        InferShapes()
    )


def qonnx_outputs(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    """The QONNX model's outputs on ``x``, sample by sample (the graph's batch is 1), computed
    by qonnx's own executor (node by node)."""
    from qonnx.core.onnx_exec import execute_onnx

    model = _wrapper(proto)
    name, x = model.graph.output[0].name, x.detach().float().cpu().numpy()
    return np.concatenate(
        [execute_onnx(model, {INPUT_NAME: x[i : i + 1]})[name] for i in range(len(x))]
    )


def bit_operations(proto: onnx.ModelProto) -> dict:
    """qonnx's inference-cost estimate of a QONNX model: ``bops`` (MACs x weight bits x
    activation bits), ``macs``, ``weight_bits`` and ``output_bits`` (bits of weights and of
    op outputs moved), ``per_node`` (the same per MAC node) and ``uncosted`` (op types the
    analysis does not cost). An estimate: no chip was run. Works on float ONNX too (every
    operand 32 bits)."""
    _qonnx()
    from qonnx.util.inference_cost import inference_cost

    # qonnx types only Quant nodes with a zero zero point (others count as float): the widths,
    # not the zero points, are what costs, so the copy analysed has its zero points at 0
    analysed = onnx.ModelProto.FromString(proto.SerializeToString())
    zeropts = {n.input[2] for n in analysed.graph.node if n.op_type == "Quant"}
    for init in analysed.graph.initializer:
        if init.name in zeropts:
            init.CopyFrom(numpy_helper.from_array(np.zeros((), np.float32), init.name))
    cost = inference_cost(_wrapper(analysed), discount_sparsity=False, cost_breakdown=True)

    def figures(c: dict) -> dict[str, float]:
        return {
            "bops": float(c.get("total_bops", 0.0)),
            "macs": float(c.get("total_macs", 0.0)),
            "weight_bits": float(c.get("total_mem_w_bits", 0.0)),
            "output_bits": float(c.get("total_mem_o_bits", 0.0)),
        }

    total = cost["total_cost"]
    unsupported = total.get("unsupported", "set()")
    uncosted = sorted(ast.literal_eval(unsupported)) if unsupported != "set()" else []
    return {
        **figures(total),
        "per_node": {name: figures(c) for name, c in cost["node_cost"].items()},
        "uncosted": uncosted,
    }


def write_qonnx(
    model: nn.Module, input_shape: tuple[int, ...], path: Path, x: torch.Tensor
) -> dict:
    """Export ``model`` as QONNX to ``path`` and check it with qonnx's executor on ``x``
    (sample by sample, at ``input_shape``'s batch of 1) against PyTorch: within one output
    step, else an error. Returns the check and :func:`bit_operations`."""
    from archnet.export import output_step

    _qonnx()
    shape = (1, *input_shape[1:])
    proto = export_qonnx(model, shape, path)
    model = model.eval()
    with torch.no_grad():
        worst = float(np.abs(qonnx_outputs(proto, x) - model(x).numpy()).max())
    step = output_step(model)
    if worst > step:
        raise ArchnetError(
            f"{path.name}: qonnx's executor differs from PyTorch by {worst:.3g} "
            f"(more than one output step, {step:.3g})"
        )
    quant_nodes = sum(n.op_type == "Quant" for n in proto.graph.node)
    checked = {"max_abs_diff": worst, "output_step": step, "quant_nodes": quant_nodes}
    return checked | bit_operations(proto)
