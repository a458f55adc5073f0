"""The quantization baselines archnet is compared against.

* ``ptq_onnxruntime``: onnxruntime's own static int8 post-training quantization of the float
  teacher (what a user gets in a few lines, with no training at all).
* ``lsq_qat``: plain LSQ quantization-aware fine-tuning of the whole teacher, distilled from
  the teacher's logits on unlabeled images (label-free, like archnet, but without blockwise
  distillation or any change of architecture).

``onnx_top1`` and ``onnx_size_bits`` score and size an ONNX model the same way for every row
of a comparison.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from archnet.distill.finetune import FinetuneConfig, finetune
from archnet.onnx_utils import export_onnx, ort_outputs
from archnet.quant.api import QuantConfig, prepare_qat

__all__ = ["lsq_qat", "onnx_size_bits", "onnx_top1", "ptq_onnxruntime"]

log = logging.getLogger(__name__)

CALIB_IMAGES = 256  # images that initialise the LSQ steps (one forward)


def _fixed_batches(images: torch.Tensor, batch: int) -> Iterator[tuple[np.ndarray, int]]:
    """``(batch of exactly `batch` images, how many are real)``; the last one padded by repeats."""
    n = len(images)
    if n == 0:
        raise ValueError("no images given")
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


def ptq_onnxruntime(
    model: nn.Module,
    calib_images: torch.Tensor,
    input_shape: tuple[int, ...],
    per_channel: bool = True,
    *,
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
) -> onnx.ModelProto:
    """onnxruntime's static int8 post-training quantization (QDQ format) of a float model.

    The model is exported at ``input_shape`` (fixed batch), pre-processed with
    ``quant_pre_process`` (shape inference and graph optimisation; skipped with a warning if
    it fails), then quantized with ``quantize_static``: int8 weights (per output channel when
    ``per_channel``), ``activation_type`` ("uint8", usual on CPU, or "int8") activations, and
    ``calibrate_method`` ("minmax", "entropy" or "percentile") ranges from ``calib_images`` fed
    in batches of exactly ``input_shape[0]`` images.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    act_types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if activation_type not in act_types:
        raise ValueError(f"activation_type must be one of {sorted(act_types)}")
    if calibrate_method not in methods:
        raise ValueError(f"calibrate_method must be one of {sorted(methods)}")
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
        input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
        quantize_static(
            str(source),
            str(q_path),
            _calibration_reader(input_name, calib_images, shape[0]),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=act_types[activation_type],
            weight_type=QuantType.QInt8,
            calibrate_method=methods[calibrate_method],
        )
        return onnx.load(str(q_path))


def lsq_qat(
    teacher: nn.Module,
    images: torch.Tensor,
    bits: tuple[int, int],
    first_last: tuple[int, int] | None,
    cfg: FinetuneConfig,
    seed: int = 0,
    on_step: Callable[[float], None] | None = None,
) -> nn.Module:
    """Plain LSQ quantization-aware fine-tuning of a copy of the whole ``teacher``.

    Batch norms are folded (``fold_bn``), every conv/linear is quantized at ``bits`` =
    ``(weight, act)`` (the first and last at ``first_last``; ``None``: the same), steps are
    calibrated on up to 256 of ``images``, then the student learns the teacher's logits on
    the unlabeled ``images`` (KD only: no labels, no block features). Returns it in eval mode.
    """
    w, a = bits
    torch.manual_seed(seed)
    teacher = teacher.eval()
    student = prepare_qat(
        copy.deepcopy(teacher), QuantConfig(w, a, first_last), images[:CALIB_IMAGES].float()
    )
    finetune(student, teacher, images, cfg, feature_names=None, seed=seed, on_step=on_step)
    return student.eval()


def onnx_top1(
    proto: onnx.ModelProto, images: torch.Tensor, labels: torch.Tensor, threads: int | None = None
) -> float:
    """Top-1 accuracy (percent) of an ONNX classifier as onnxruntime runs it on the CPU."""
    threads = threads or max(1, min(os.cpu_count() or 1, 4))
    pred = ort_outputs(proto, images, threads=threads).argmax(-1)
    return float((pred == labels.cpu().numpy()).mean() * 100)


def onnx_size_bits(proto: onnx.ModelProto) -> int:
    """Storage of every initializer (weights, biases, scales, zero points) at its type's width."""
    total = 0
    for init in proto.graph.initializer:
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        if init.data_type == TensorProto.STRING:
            continue
        np_type = helper.tensor_dtype_to_np_dtype(init.data_type)
        width = 4 if init.data_type in _FOUR_BIT else np.dtype(np_type).itemsize * 8
        total += numel * width
    return total


_FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4}
