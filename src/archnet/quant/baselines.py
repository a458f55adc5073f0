"""The quantization baselines archnet is compared against.

* ``ptq_onnxruntime`` (``archnet.quant.ptq``): onnxruntime's own static post-training
  quantization of the float teacher (what a user gets in a few lines, with no training).
* ``lsq_qat``: plain LSQ quantization-aware fine-tuning of the whole teacher, distilled from
  the teacher's logits on unlabeled images (label-free, like archnet, but without blockwise
  distillation or any change of architecture).

``onnx_top1`` scores an ONNX model the same way for every row of a comparison (and
``archnet.quant.onnx_bytes`` sizes it).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import onnx
import torch
from torch import nn

from archnet.distill.finetune import FinetuneConfig, finetune
from archnet.onnx_utils import ort_outputs
from archnet.quant.api import QuantConfig, prepare_qat
from archnet.quant.ptq import ptq_onnxruntime, u8s8_saturates

__all__ = ["lsq_qat", "onnx_top1", "ptq_onnxruntime", "u8s8_saturates"]

CALIB_IMAGES = 256  # images that initialise the LSQ steps (one forward)


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
