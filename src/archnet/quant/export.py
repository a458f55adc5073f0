"""ONNX export of a fake-quantized model as QuantizeLinear/DequantizeLinear (QDQ) pairs.

QDQ is the format onnxruntime and TensorRT turn into integer kernels. The model is exported
with each quantizer as a placeholder node that keeps its bit width, then every placeholder is
rewritten: weights become stored integers plus ``DequantizeLinear``, activations a
``QuantizeLinear -> DequantizeLinear`` pair (the patterns of ``archnet.quant.qdq``). 2-4 bit
tensors are stored as INT4/UINT4 (opset 21) wherever the installed onnxruntime was found to
run that pattern exactly (``archnet.quant.int4``), else in INT8/UINT8 containers; a ``Clip``
narrows activations to their bit width whenever the storage type is wider.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, version_converter
from torch import nn

from archnet.errors import ArchnetError
from archnet.onnx_utils import OnnxIO, export_onnx, exporter_of, ort_session, stamp_exporter
from archnet.quant.int4 import INT4_OPSET, int4_supported
from archnet.quant.lsq import MIN_STEP, LSQQuantizer
from archnet.quant.modules import QuantModule
from archnet.quant.qdq import Storage, activation_qdq, storage_for, weight_dq

__all__ = [
    "PlaceholderRewriter",
    "export_any",
    "export_qdq",
    "export_rewritten",
    "int4_supported",
    "qdq_report",
]

PLACEHOLDER_DOMAIN = "archnet"
REPORT_KEY = "archnet.qdq"


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@dataclass
class _Tensor:
    """What one exported placeholder quantizes: its quantizer and, for a weight, the weight."""

    name: str
    quantizer: LSQQuantizer
    weight: torch.Tensor | None


def _quantized_tensors(model: nn.Module) -> list[_Tensor]:
    """Every quantizer with the tensor it reads, in a fixed order (index = export id)."""
    tensors: list[_Tensor] = []
    weight_quants = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            weight_quants[id(module.weight_quant)] = (f"{name}.weight", module.weight)
    for name, module in model.named_modules():
        if isinstance(module, LSQQuantizer):
            weight_name, weight = weight_quants.get(id(module), (name, None))
            tensors.append(_Tensor(weight_name, module, weight))
    return tensors


def _pattern(entry: _Tensor) -> str:
    """The int4 probe's name for the Q/DQ pattern that stores ``entry`` in 4 bits."""
    if entry.weight is not None:
        return "weight"
    return "activation" if entry.quantizer.bits == 4 else "narrowed_activation"


class PlaceholderRewriter:
    """What ``export_rewritten`` needs of a rewriter: the quantizers by export id, the
    initializers it adds, one report entry per rewritten tensor, and unique names for a
    quantizer rewritten on several tensors (one shared across a max-pool)."""

    def __init__(self, tensors: list[_Tensor]) -> None:
        self.tensors = tensors
        self.report: list[dict] = []
        self.new_init: list[onnx.TensorProto] = []
        self._uses: dict[int, int] = {}

    def prefix(self, base: str, index: int) -> str:
        """A name prefix unique to this rewrite of quantizer ``index``."""
        uses = self._uses[index] = self._uses.get(index, 0) + 1
        return f"{base}{index}" if uses == 1 else f"{base}{index}_{uses}"


class _Rewriter(PlaceholderRewriter):
    """Replaces placeholder nodes with Q/DQ, collecting new nodes, initializers and a report."""

    def __init__(self, tensors: list[_Tensor], use_int4: bool) -> None:
        super().__init__(tensors)
        self.use_int4 = use_int4
        self.four_bit = False  # whether any tensor is stored in 4 bits (needs opset 21)

    def _storage(self, entry: _Tensor) -> Storage:
        """Weights signed; activations in 8-bit containers unsigned, a signed grid shifted by
        its zero point (the same values): onnxruntime fuses a convolution into an integer
        kernel only when its input and output share one type."""
        quant = entry.quantizer
        four = self.use_int4 and quant.bits <= 4 and int4_supported(_pattern(entry))
        self.four_bit |= four
        return storage_for(quant.signed and (four or entry.weight is not None), four)

    def rewrite(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        index = _attr(node, "id")
        entry = self.tensors[index]
        quant = entry.quantizer
        storage = self._storage(entry)
        prefix = self.prefix("qdq", index)
        out = node.output[0]
        step_t = quant.step.detach().float().clamp_min(MIN_STEP).cpu()
        step = step_t.numpy().reshape(-1)
        if entry.weight is not None:  # a weight: store it already quantized
            axis = _attr(node, "axis")
            w = entry.weight.detach().float().cpu()
            shape = [1] * w.dim()
            if step.size > 1:
                shape[axis] = -1
            # The same float ops as the quantizer's forward, so the integers match it exactly.
            q = torch.clamp(w / step_t.reshape(shape), quant.qmin, quant.qmax).round().numpy()
            tensor, kind = f"{entry.name}_quantized", "weight"
            emitted = weight_dq(prefix, tensor, q.astype(np.int64), step, axis, storage, out)
        else:  # an activation: quantize at run time
            tensor, kind = node.input[0], "activation"
            qrange = (quant.qmin, quant.qmax)
            emitted = activation_qdq(prefix, tensor, out, float(step[0]), qrange, storage)
        self.new_init.extend(emitted.initializers)
        self.report.append(
            {
                "name": entry.name,
                # the graph tensor it describes: the stored integers, or the quantized input
                "tensor": tensor,
                "kind": kind,
                "bits": quant.bits,
                "signed": quant.signed,
                "zero_point": quant.zero_point_value,
                "per_channel": step.size > 1,
                "storage": storage.name,
            }
        )
        return emitted.nodes


def _opset(model: onnx.ModelProto) -> int:
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)


def _check_quantizers(model: nn.Module) -> None:
    missing = [
        n for n, m in model.named_modules() if isinstance(m, LSQQuantizer) and not m.initialized
    ]
    if missing:
        raise ValueError(
            "quantizers have no step yet (run a calibration forward pass first): "
            + ", ".join(missing[:5])
        )


def _rewrite_placeholders(graph: onnx.GraphProto, rewriter) -> list[onnx.NodeProto]:
    """The graph's nodes with each placeholder rewritten once per quantizer and tensor: a
    quantizer shared by several readers of one tensor (or applied again to its own output,
    where it is the identity) becomes one Q/DQ pair, which runtimes fuse into integer kernels."""
    nodes: list[onnx.NodeProto] = []
    done: dict[tuple[str, int], str] = {}  # (input, quantizer id) -> rewritten output
    made_by: dict[str, int] = {}  # a rewritten output -> its quantizer's id
    alias: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        if node.domain != PLACEHOLDER_DOMAIN:
            nodes.append(node)
            continue
        index, src, out = _attr(node, "id"), node.input[0], node.output[0]
        if made_by.get(src) == index:
            alias[out] = src
        elif (src, index) in done:
            alias[out] = done[src, index]
        else:
            done[src, index], made_by[out] = out, index
            nodes.extend(rewriter.rewrite(node))
    for output in graph.output:
        if output.name in alias:  # keep the graph's output name: an Identity carries it
            nodes.append(helper.make_node("Identity", [alias[output.name]], [output.name]))
    return nodes


def export_rewritten(
    model: nn.Module,
    rewriter,
    input_shape: tuple[int, ...] | None,
    exporter: str | None,
    args: tuple[torch.Tensor, ...] | None,
    names: OnnxIO | None,
) -> tuple[onnx.ModelProto, str | None]:
    """Export ``model`` with each quantizer as a placeholder node (bit width, sign, id) and let
    ``rewriter.rewrite(node)`` (a ``PlaceholderRewriter``) replace each one.
    Returns the rewritten model (unchecked) and its exporter tag."""
    _check_quantizers(model)
    tensors = rewriter.tensors
    for index, entry in enumerate(tensors):
        entry.quantizer.export_id = index
    try:
        exported = export_onnx(model, input_shape, exporter=exporter, args=args, names=names)
    finally:
        for entry in tensors:
            entry.quantizer.export_id = -1
    tag = exporter_of(exported)
    graph = exported.graph
    nodes = _rewrite_placeholders(graph, rewriter)
    missing = {t.name for t in tensors} - {entry["name"] for entry in rewriter.report}
    if missing:  # an exporter that does not keep the placeholders would drop the quantizers
        raise ArchnetError(
            f"the ONNX export ({tag}) lost {len(missing)} of {len(tensors)} quantizers (e.g. "
            f"{sorted(missing)[0]}); a quantized export needs the TorchScript exporter"
        )
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + rewriter.new_init)
    imports = [op for op in exported.opset_import if op.domain != PLACEHOLDER_DOMAIN]
    del exported.opset_import[:]
    exported.opset_import.extend(imports)
    del graph.value_info[:]  # shapes of rewritten tensors are re-inferred by the runtime
    return exported, tag


def export_qdq(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    path: str | Path | None = None,
    int4: bool = True,
    exporter: str | None = None,
    *,
    args: tuple[torch.Tensor, ...] | None = None,
    names: OnnxIO | None = None,
) -> onnx.ModelProto:
    """Export a fake-quantized model as an onnxruntime-runnable QDQ graph.

    Weights are stored as integers (per output channel scales) feeding ``DequantizeLinear``;
    each quantized input is a ``QuantizeLinear -> DequantizeLinear`` pair; biases stay float.
    The per-tensor bit width and storage type are recorded in the model's metadata and read
    back by ``qdq_report``. With ``int4`` a 2-4 bit tensor is stored as INT4/UINT4 (packed,
    opset 21) wherever ``int4_supported`` found that onnxruntime runs its pattern exactly,
    as written and fully optimised; elsewhere, or with ``int4=False``, it sits in an
    INT8/UINT8 container (a ``Clip`` narrowing activations to their bit width).
    ``exporter`` forces one ONNX exporter (see ``export_onnx``); its tag is kept in metadata.
    ``args`` and ``names`` export a model with several (or integer) inputs from example
    tensors, as in ``export_onnx``. Every quantizer of ``model`` must be used by its forward.
    """
    rewriter = _Rewriter(_quantized_tensors(model), int4)
    exported, tag = export_rewritten(model, rewriter, input_shape, exporter, args, names)
    if rewriter.four_bit and _opset(exported) < INT4_OPSET:
        exported = version_converter.convert_version(exported, INT4_OPSET)
        del exported.graph.value_info[:]
    onnx.checker.check_model(exported)
    if rewriter.four_bit and not _optimizable(exported):
        # onnxruntime's QDQ propagation can fail on a whole graph whose 4-bit patterns each
        # pass the probe (an 8-bit Q moved across a Reshape in an opset-21 model): 8-bit
        # containers then, as the report's storage says
        return export_qdq(model, input_shape, path, False, exporter, args=args, names=names)
    helper.set_model_props(exported, {REPORT_KEY: json.dumps(rewriter.report)})
    stamp_exporter(exported, tag)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(exported, str(path))
    return exported


def _optimizable(proto: onnx.ModelProto) -> bool:
    """Whether onnxruntime builds a fully optimised session for ``proto``."""
    try:
        ort_session(proto)
    except Exception:  # noqa: BLE001 - any refusal means: not this graph
        return False
    return True


def qdq_report(model_proto: onnx.ModelProto) -> list[dict]:
    """Per quantized tensor: ``name``, ``kind``, ``bits``, ``signed``, ``per_channel``, ``storage``."""
    for prop in model_proto.metadata_props:
        if prop.key == REPORT_KEY:
            return json.loads(prop.value)
    return []


def export_any(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    exporter: str | None = None,
    *,
    args: tuple[torch.Tensor, ...] | None = None,
    names: OnnxIO | None = None,
) -> onnx.ModelProto:
    """QDQ ONNX for a fake-quantized model, plain ONNX for a float one."""
    if any(isinstance(m, QuantModule) for m in model.modules()):
        return export_qdq(model, input_shape, exporter=exporter, args=args, names=names)
    return export_onnx(model, input_shape, exporter=exporter, args=args, names=names)
