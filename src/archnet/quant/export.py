"""ONNX export of a fake-quantized model as QuantizeLinear/DequantizeLinear (QDQ) pairs.

QDQ is the format onnxruntime and TensorRT turn into integer kernels. The model is exported
with each quantizer as a placeholder node that keeps its bit width, then every placeholder is
rewritten: weights become stored integers plus ``DequantizeLinear``, activations a
``QuantizeLinear -> DequantizeLinear`` pair. 2-4 bit tensors can be stored as INT4/UINT4
(opset 21) where the installed onnxruntime runs them on CPU, or as INT8/UINT8; a
``Clip`` narrows activations to their bit width whenever the storage type is wider.
INT8 is the default; see ``export_qdq``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from torch import nn

from archnet.onnx_utils import export_onnx
from archnet.quant.lsq import MIN_STEP, LSQQuantizer
from archnet.quant.modules import QuantModule

__all__ = ["export_any", "export_qdq", "int4_supported", "qdq_report"]

PLACEHOLDER_DOMAIN = "archnet"
REPORT_KEY = "archnet.qdq"
_INT4_OPSET = 21

_STORAGE = {
    # (signed, int4): (onnx type, name, bits)
    (True, False): (TensorProto.INT8, "int8", 8),
    (False, False): (TensorProto.UINT8, "uint8", 8),
    (True, True): (TensorProto.INT4, "int4", 4),
    (False, True): (TensorProto.UINT4, "uint4", 4),
}
_NARROW = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}


@functools.cache
def int4_supported() -> bool:
    """Whether onnxruntime's CPU provider runs INT4/UINT4 Q/DQ (opset 21) correctly here."""
    x = np.array([-9.0, -1.0, 0.4, 3.0, 9.0], np.float32)
    try:
        for qtype, expected in (
            (TensorProto.INT4, [-8, -1, 0, 3, 7]),
            (TensorProto.UINT4, [0, 0, 0, 3, 9]),
        ):
            zp = helper.make_tensor("zp", qtype, [], [0])
            scale = numpy_helper.from_array(np.array(1.0, np.float32), "scale")
            graph = helper.make_graph(
                [
                    helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
                    helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"]),
                ],
                "int4_probe",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
                [scale, zp],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _INT4_OPSET)])
            session = ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            (y,) = session.run(None, {"x": x})
            if not np.array_equal(y, np.array(expected, np.float32)):
                return False
    except Exception:  # any failure means int4 is not usable here
        return False
    return True


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


class _Rewriter:
    """Replaces placeholder nodes with Q/DQ, collecting new nodes, initializers and a report."""

    def __init__(self, tensors: list[_Tensor], use_int4: bool) -> None:
        self.tensors = tensors
        self.use_int4 = use_int4
        self.report: list[dict] = []
        self.new_init: list[onnx.TensorProto] = []
        self.to_int4: list[tuple[str, int]] = []  # (initializer, final type), retyped later

    def _int_tensor(self, name: str, array: np.ndarray, qtype: int) -> None:
        """Integer initializer, written as 8-bit for now and retyped to 4-bit after conversion."""
        dtype = np.int8 if qtype in (TensorProto.INT4, TensorProto.INT8) else np.uint8
        self.new_init.append(numpy_helper.from_array(array.astype(dtype), name))
        if qtype in _NARROW:
            self.to_int4.append((name, qtype))

    def rewrite(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        index = _attr(node, "id")
        entry = self.tensors[index]
        quant = entry.quantizer
        bits, signed, axis = quant.bits, quant.signed, _attr(node, "axis")
        qmin, qmax = quant.qmin, quant.qmax
        qtype, storage, storage_bits = _STORAGE[(signed, self.use_int4 and bits <= 4)]
        out = node.output[0]
        prefix = f"qdq{index}"
        step_t = quant.step.detach().float().clamp_min(MIN_STEP).cpu()
        step = step_t.numpy().reshape(-1)
        per_channel = step.size > 1
        scale_name, zp_name = f"{prefix}_scale", f"{prefix}_zero_point"
        self.new_init.append(numpy_helper.from_array(step if per_channel else step[0], scale_name))
        self._int_tensor(zp_name, np.zeros(step.shape if per_channel else (), np.int64), qtype)
        dq_attrs = {"axis": axis} if per_channel else {}
        nodes: list[onnx.NodeProto] = []
        if entry.weight is not None:  # a weight: store it already quantized
            w = entry.weight.detach().float().cpu()
            shape = [1] * w.dim()
            if per_channel:
                shape[axis] = -1
            # The same float ops as the quantizer's forward, so the integers match it exactly.
            q = torch.clamp(w / step_t.reshape(shape), qmin, qmax).round().numpy()
            q_name = f"{entry.name}_quantized"
            self._int_tensor(q_name, q, qtype)
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [q_name, scale_name, zp_name], [out], **dq_attrs
                )
            )
            kind = "weight"
        else:  # an activation: quantize at run time
            q_in = node.input[0]
            if bits < storage_bits:
                lo, hi = f"{prefix}_clip_min", f"{prefix}_clip_max"
                self.new_init.append(numpy_helper.from_array(np.float32(qmin * step[0]), lo))
                self.new_init.append(numpy_helper.from_array(np.float32(qmax * step[0]), hi))
                q_in = f"{prefix}_clipped"
                nodes.append(helper.make_node("Clip", [node.input[0], lo, hi], [q_in]))
            q_out = f"{prefix}_q"
            nodes.append(helper.make_node("QuantizeLinear", [q_in, scale_name, zp_name], [q_out]))
            nodes.append(helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [out]))
            kind = "activation"
        self.report.append(
            {
                "name": entry.name,
                # the graph tensor it describes: the stored integers, or the quantized input
                "tensor": q_name if entry.weight is not None else node.input[0],
                "kind": kind,
                "bits": bits,
                "signed": signed,
                "per_channel": per_channel,
                "storage": storage,
            }
        )
        return nodes


def _retype(model: onnx.ModelProto, to_int4: list[tuple[str, int]]) -> None:
    """Turn the 8-bit placeholders of 2-4 bit tensors into INT4/UINT4 initializers."""
    wanted = dict(to_int4)
    graph = model.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.name in wanted:
            array = numpy_helper.to_array(tensor)
            graph.initializer[i].CopyFrom(
                helper.make_tensor(
                    tensor.name, wanted[tensor.name], array.shape, array.flatten().tolist()
                )
            )


def _check_quantizers(model: nn.Module) -> None:
    missing = [
        n for n, m in model.named_modules() if isinstance(m, LSQQuantizer) and not m.initialized
    ]
    if missing:
        raise ValueError(
            "quantizers have no step yet (run a calibration forward pass first): "
            + ", ".join(missing[:5])
        )


def export_qdq(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path | None = None,
    int4: bool = False,
) -> onnx.ModelProto:
    """Export a fake-quantized model as an onnxruntime-runnable QDQ graph.

    Weights are stored as integers (per output channel scales) feeding ``DequantizeLinear``;
    each quantized input is a ``QuantizeLinear -> DequantizeLinear`` pair; biases stay float.
    The per-tensor bit width and storage type are recorded in the model's metadata and read
    back by ``qdq_report``. ``int4=True`` stores 2-4 bit tensors as INT4/UINT4 when
    ``int4_supported()``. It is off by default: onnxruntime runs such graphs, but its
    optimised CPU path (``ORT_ENABLE_ALL``) was seen to drift by more than one output step
    from the fake-quantized model, while int8 storage with a narrowed range stays exact.
    """
    _check_quantizers(model)
    tensors = _quantized_tensors(model)
    for index, entry in enumerate(tensors):
        entry.quantizer.export_id = index
    try:
        exported = export_onnx(model, input_shape)
    finally:
        for entry in tensors:
            entry.quantizer.export_id = -1
    graph = exported.graph
    rewriter = _Rewriter(tensors, int4 and int4_supported())
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain == PLACEHOLDER_DOMAIN:
            nodes.extend(rewriter.rewrite(node))
        else:
            nodes.append(node)
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
    onnx.checker.check_model(exported)
    if rewriter.to_int4:
        exported = version_converter.convert_version(exported, _INT4_OPSET)
        _retype(exported, rewriter.to_int4)
        del exported.graph.value_info[:]  # inferred while the tensors were still 8-bit
        onnx.checker.check_model(exported)
    helper.set_model_props(exported, {REPORT_KEY: json.dumps(rewriter.report)})
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(exported, str(path))
    return exported


def qdq_report(model_proto: onnx.ModelProto) -> list[dict]:
    """Per quantized tensor: ``name``, ``kind``, ``bits``, ``signed``, ``per_channel``, ``storage``."""
    for prop in model_proto.metadata_props:
        if prop.key == REPORT_KEY:
            return json.loads(prop.value)
    return []


def export_any(model: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """QDQ ONNX for a fake-quantized model, plain ONNX for a float one."""
    if any(isinstance(m, QuantModule) for m in model.modules()):
        return export_qdq(model, input_shape)
    return export_onnx(model, input_shape)
