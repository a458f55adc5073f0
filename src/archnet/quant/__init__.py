"""Sub-8-bit quantization-aware training for students (LSQ) and its QDQ ONNX export."""

from archnet.quant.api import (
    QuantConfig,
    calibrate,
    fold_bn,
    is_quantized,
    model_size_bits,
    parse_bits,
    prepare_qat,
    quantize_model,
    strip_quantizers,
)
from archnet.quant.export import export_any, export_qdq, qdq_report
from archnet.quant.int4 import int4_probe, int4_supported
from archnet.quant.lsq import QUANTIZER_VERSION, LSQQuantizer, quant_range
from archnet.quant.modules import QuantConv2d, QuantLinear, QuantModule, mark_unsigned_after_relu
from archnet.quant.size import OnnxSize, onnx_bytes

__all__ = [
    "QUANTIZER_VERSION",
    "LSQQuantizer",
    "OnnxSize",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantModule",
    "calibrate",
    "export_any",
    "export_qdq",
    "fold_bn",
    "int4_probe",
    "int4_supported",
    "is_quantized",
    "mark_unsigned_after_relu",
    "model_size_bits",
    "onnx_bytes",
    "parse_bits",
    "prepare_qat",
    "qdq_report",
    "quant_range",
    "quantize_model",
    "strip_quantizers",
]
