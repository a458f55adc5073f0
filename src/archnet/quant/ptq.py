"""onnxruntime's static post-training quantization of a float model, at 8, 4 or fewer bits.

The baseline a user gets in a few lines, with no training: ``quantize_static`` in QDQ format.
Two things are set on top of onnxruntime's defaults, each because the default would measure
something else than the method:

* weights below 4 bits, which onnxruntime has no type for, are stored as INT4 with per-channel
  scales that follow onnxruntime's own symmetric MinMax rule at that width
  (``max|w| / (2^(b-1) - 1)``: 2-bit weights take the values -1, 0, 1);
* 8-bit weights are quantized to 7 bits (``reduce_range``) where onnxruntime's fused
  uint8 x int8 kernels saturate on this CPU (``u8s8_saturates``), as onnxruntime advises.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from torch import nn

from archnet.errors import ArchnetError
from archnet.onnx_utils import export_onnx

__all__ = ["ptq_onnxruntime", "u8s8_saturates"]

log = logging.getLogger(__name__)

_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
_INT4_OPSET = 21


def _saturation_probe() -> tuple[onnx.ModelProto, np.ndarray, float]:
    """A QDQ 1x1 conv whose uint8 x int8 products overflow int16 in pairs, and its answer.

    Four input channels of 255 times weights of 127: each pair of products sums to 64770,
    past int16's 32767. Exact: 4 * 255 * 127 = 129540, just over 126.5 output steps of 1024,
    so the answer is 127 * 1024; with each pair clamped to 32767 it is 64 * 1024.
    """
    inits = [
        numpy_helper.from_array(np.float32(1.0), "x_scale"),
        numpy_helper.from_array(np.uint8(0), "x_zp"),
        numpy_helper.from_array(np.full((1, 4, 1, 1), 127, np.int8), "w_q"),
        numpy_helper.from_array(np.float32(1.0), "w_scale"),
        numpy_helper.from_array(np.int8(0), "w_zp"),
        numpy_helper.from_array(np.float32(1024.0), "y_scale"),
        numpy_helper.from_array(np.uint8(0), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"]),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "u8s8_saturation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 2, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, np.full((1, 4, 2, 2), 255, np.float32), 127 * 1024.0


@functools.cache
def u8s8_saturates() -> bool:
    """Whether onnxruntime's fused uint8 x int8 conv saturates on this CPU.

    On x86 without VNNI (AVX2 only) onnxruntime's integer kernels add pairs of u8 x s8
    products in 16 bits (``VPMADDUBSW``), which clamps large sums; an int8 PTQ model then
    drifts far from its float model under full optimisation (the graph as written is fine).
    onnxruntime's documented remedy is ``reduce_range`` (7-bit weights). Probed once on a
    QDQ conv built to overflow; a failure to run counts as saturating.
    """
    model, x, exact = _saturation_probe()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        (y,) = session.run(None, {"x": x})
    except Exception:  # an unusable integer conv is no better than a saturating one
        return True
    return not np.allclose(y, exact)


def _fixed_batches(images: torch.Tensor, batch: int) -> Iterator[tuple[np.ndarray, int]]:
    """``(batch of exactly `batch` images, how many are real)``; the last one padded by repeats."""
    n = len(images)
    if n == 0:
        raise ArchnetError("no calibration images given")
    for lo in range(0, n, batch):
        x = images[lo : lo + batch].float()
        real = len(x)
        if real < batch:
            pad = images[torch.arange(batch - real) % n].float()
            x = torch.cat([x, pad])
        yield x.cpu().numpy(), real


def _calibration_reader(input_name: str, images: torch.Tensor, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(list(_fixed_batches(images, batch)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._it, None)
            return None if item is None else {input_name: item[0]}

    return _Reader()


def _weight_type(bits: int):
    from onnxruntime.quantization import QuantType

    if bits == 8:
        return QuantType.QInt8
    if 2 <= bits <= 4:
        return QuantType.QInt4
    raise ArchnetError(f"PTQ weight bits must be 8 or 2-4, got {bits}")


def _activation_type(bits: int, signed: bool):
    from onnxruntime.quantization import QuantType

    types = {
        (8, False): QuantType.QUInt8,
        (8, True): QuantType.QInt8,
        (4, False): QuantType.QUInt4,
        (4, True): QuantType.QInt4,
    }
    if (bits, signed) not in types:
        raise ArchnetError(f"onnxruntime quantizes activations at 8 or 4 bits, not {bits}")
    return types[(bits, signed)]


def _channel_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a compute node's weight, as onnxruntime quantizes it."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: weight is (in, out)


def _narrow_weight_scales(weight: np.ndarray, axis: int, bits: int, per_channel: bool) -> list:
    """onnxruntime's symmetric MinMax scales for a ``bits``-wide signed grid."""
    qmax = 2 ** (bits - 1) - 1
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    peaks = np.abs(moved).max(1) if per_channel else np.abs(weight).max(keepdims=True)
    scales = np.maximum(peaks, np.finfo(np.float32).tiny) / qmax
    entries = [{"scale": np.float32(s), "zero_point": np.int8(0)} for s in scales]
    if per_channel:
        entries[0]["axis"] = axis
    return entries


def _overrides(
    model: onnx.ModelProto,
    bits: tuple[int, int],
    first_last: tuple[int, int] | None,
    signed_activations: bool,
    per_channel: bool,
    reduce_range: bool,
) -> dict[str, list[dict]]:
    """Per-tensor settings: the first and last layers' width, sub-4-bit scales, 7-bit weights."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in _COMPUTE_OPS and n.input[1] in inits]
    edges = {id(nodes[0]), id(nodes[-1])} if nodes and first_last is not None else set()
    out: dict[str, list[dict]] = {}
    for node in nodes:
        w_bits, a_bits = first_last if id(node) in edges else bits
        weight = node.input[1]
        if w_bits < 4:
            array = numpy_helper.to_array(inits[weight]).astype(np.float32)
            entries = _narrow_weight_scales(array, _channel_axis(node), w_bits, per_channel)
            entries[0]["quant_type"] = _weight_type(w_bits)
        else:
            entries = [{"quant_type": _weight_type(w_bits)}]
            if w_bits == 8:
                entries[0]["reduce_range"] = reduce_range
            if per_channel:  # an override without an axis would make the weight per-tensor
                entries[0]["axis"] = _channel_axis(node)
        out[weight] = entries
        if id(node) in edges:
            out[node.input[0]] = [{"quant_type": _activation_type(a_bits, signed_activations)}]
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)


def _to_int4_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model at opset 21, where standard Q/DQ take 4-bit types (onnxruntime would
    otherwise fall back to its own ``com.microsoft`` Q/DQ)."""
    try:
        return version_converter.convert_version(model, _INT4_OPSET)
    except Exception as exc:  # the contrib-domain Q/DQ still run in onnxruntime
        log.warning("opset conversion for 4-bit PTQ failed (%s); onnxruntime's own Q/DQ", exc)
        return model


def ptq_onnxruntime(
    model: nn.Module,
    calib_images: torch.Tensor,
    input_shape: tuple[int, ...],
    per_channel: bool = True,
    *,
    bits: tuple[int, int] = (8, 8),
    first_last: tuple[int, int] | None = None,
    signed_activations: bool = False,
    calibrate_method: str = "minmax",
    reduce_range: bool | None = None,
) -> onnx.ModelProto:
    """onnxruntime's static post-training quantization (QDQ format) of a float model.

    The model is exported at ``input_shape`` (fixed batch), pre-processed with
    ``quant_pre_process`` (shape inference and graph optimisation; skipped with a warning if
    it fails), then quantized with ``quantize_static`` at ``bits`` = (weight, activation):
    weights 8 or 2-4 bits (symmetric, per output channel when ``per_channel``), activations 8
    or 4 bits (unsigned, the CPU's usual choice, unless ``signed_activations``), the first and
    last conv/linear layers at ``first_last`` (``None``: like the others), ranges by
    ``calibrate_method`` ("minmax", "entropy" or "percentile") from ``calib_images`` fed in
    batches of exactly ``input_shape[0]`` images. ``reduce_range`` quantizes 8-bit weights to
    7 bits; ``None`` does so exactly where ``u8s8_saturates()``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if calibrate_method not in methods:
        raise ArchnetError(f"calibrate_method must be one of {', '.join(methods)}")
    widths = [bits] if first_last is None else [bits, first_last]
    for w, a in widths:  # refuse a width before any work
        _weight_type(w)
        _activation_type(a, signed_activations)
    rr = u8s8_saturates() if reduce_range is None else reduce_range
    shape = tuple(int(s) for s in input_shape)
    with tempfile.TemporaryDirectory(prefix="archnet-ptq-") as tmp:
        tmp_dir = Path(tmp)
        float_path, pre_path, q_path = (tmp_dir / f for f in ("float.onnx", "pre.onnx", "q.onnx"))
        export_onnx(model, shape, float_path)
        source = float_path
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(float_path), str(pre_path))
            source = pre_path
        except Exception as exc:  # pre-processing only helps; quantize without it
            log.warning("quant_pre_process failed (%s); quantizing the raw export", exc)
        float_model = onnx.load(str(source))
        if any(min(w) < 8 for w in widths) and _opset(float_model) < _INT4_OPSET:
            float_model = _to_int4_opset(float_model)
            source = tmp_dir / "opset21.onnx"
            onnx.save_model(float_model, str(source))
        overrides = _overrides(float_model, bits, first_last, signed_activations, per_channel, rr)
        quantize_static(
            str(source),
            str(q_path),
            _calibration_reader(float_model.graph.input[0].name, calib_images, shape[0]),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=_activation_type(bits[1], signed_activations),
            weight_type=_weight_type(bits[0]),
            calibrate_method=methods[calibrate_method],
            reduce_range=False,  # set per 8-bit weight in the overrides
            extra_options={"TensorQuantOverrides": overrides},
        )
        return onnx.load(str(q_path))
