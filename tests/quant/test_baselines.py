"""Quantization baselines: onnxruntime static PTQ and plain LSQ QAT of the whole teacher."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from archnet.data import ImageData, digits
from archnet.distill.finetune import FinetuneConfig
from archnet.distill.losses import kd_kl
from archnet.errors import ArchnetError
from archnet.export import output_step
from archnet.onnx_utils import export_onnx, ort_session
from archnet.quant import QuantConfig, QuantModule, export_qdq, onnx_bytes, prepare_qat
from archnet.quant.baselines import lsq_qat, onnx_top1, ptq_onnxruntime, u8s8_saturates
from archnet.quant.ptq import _saturation_probe
from archnet.zoo import train_classifier

SIZE = 16


def _net() -> nn.Module:
    """A small conv net with batch norms that ``fold_bn`` folds (Sequential pairs)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def digits_teacher() -> tuple[nn.Module, ImageData, ImageData]:
    """The small net trained briefly on 16x16 digits: a teacher with real decisions to copy."""
    train, held = digits(size=SIZE).split(0.8, seed=0)
    teacher = train_classifier(_net(), train, epochs=8, lr=1e-2, progress=False)
    return teacher, train, held


@pytest.fixture(scope="module")
def ptq_model(digits_teacher) -> tuple[nn.Module, onnx.ModelProto]:
    teacher, train, _ = digits_teacher
    # 30 calibration images at batch 8: the last batch is padded to the fixed export size
    return teacher, ptq_onnxruntime(teacher, train.images[:30], (8, 3, SIZE, SIZE))


def test_ptq_is_qdq_and_close_to_float(ptq_model, digits_teacher) -> None:
    teacher, _, held = digits_teacher
    _, proto = ptq_model
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == TensorProto.INT8 for t in proto.graph.initializer)
    x = held.images[:8]
    session = ort_session(proto)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = teacher(x).numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.05 * float(ref.max() - ref.min())
    # int8 weights: far smaller than the float export
    float_proto = export_onnx(teacher, (8, 3, SIZE, SIZE))
    assert onnx_bytes(proto).initializer_bytes < 0.5 * onnx_bytes(float_proto).initializer_bytes
    # and nearly the float model's accuracy
    ref_top1 = onnx_top1(float_proto, held.images, held.labels)
    assert ref_top1 > 80
    assert onnx_top1(proto, held.images, held.labels) > ref_top1 - 3


def _weights(proto: onnx.ModelProto) -> list[tuple[int, np.ndarray]]:
    """(ONNX type, integers) of every stored conv/linear weight, in graph order."""
    return [
        (t.data_type, numpy_helper.to_array(t).astype(np.int64))
        for t in proto.graph.initializer
        if t.data_type in (TensorProto.INT8, TensorProto.INT4) and len(t.dims) > 1
    ]


def _weight_ranges(proto: onnx.ModelProto) -> set[tuple[int, int]]:
    """(min, max) of every stored int8 conv/linear weight."""
    return {(int(w.min()), int(w.max())) for t, w in _weights(proto) if t == TensorProto.INT8}


def test_ptq_reduces_the_weight_range_where_kernels_saturate(ptq_model) -> None:
    """Per-channel MinMax puts every channel's largest weight at the grid's edge: 127 with
    8-bit weights, 64 with onnxruntime's 7-bit ``reduce_range``."""
    edge = 64 if u8s8_saturates() else 127
    assert _weight_ranges(ptq_model[1]) == {(-edge, edge)}


def test_ptq_reduce_range_can_be_forced(digits_teacher) -> None:
    teacher, train, _ = digits_teacher
    for reduce_range, edge in ((True, 64), (False, 127)):
        proto = ptq_onnxruntime(
            teacher, train.images[:16], (8, 3, SIZE, SIZE), reduce_range=reduce_range
        )
        assert _weight_ranges(proto) == {(-edge, edge)}


@pytest.mark.parametrize(("bits", "peak"), [((4, 4), 7), ((2, 4), 1), ((3, 4), 3)])
def test_ptq_below_8_bits(digits_teacher, bits: tuple[int, int], peak: int) -> None:
    """4-bit weights use onnxruntime's INT4; narrower ones its symmetric MinMax rule in INT4
    storage, every channel reaching the grid's edge; the first and last layers keep 8 bits."""
    teacher, train, held = digits_teacher
    proto = ptq_onnxruntime(
        teacher, train.images[:16], (8, 3, SIZE, SIZE), bits=bits, first_last=(8, 8)
    )
    qdq = [n for n in proto.graph.node if n.op_type.endswith("QuantizeLinear")]
    assert qdq and {n.domain for n in qdq} == {""}  # standard opset-21 Q/DQ, not contrib ops
    weights = _weights(proto)
    assert len(weights) == 4  # three convs and the linear layer
    (first_type, _), *inner, (last_type, _) = weights
    assert first_type == last_type == TensorProto.INT8
    for onnx_type, w in inner:
        assert onnx_type == TensorProto.INT4
        per_channel = np.abs(w.reshape(w.shape[0], -1)).max(1)
        assert set(per_channel.tolist()) <= {peak, peak + 1}  # INT4's -8 may hold 8 at 4 bits
        assert w.min() >= -peak - (1 if peak == 7 else 0) and w.max() <= peak
    x = held.images[:8].numpy()
    outs = [ort_session(proto, optimize=o).run(None, {"input": x})[0] for o in (False, True)]
    assert np.allclose(outs[0], outs[1], atol=1e-4)  # both runtimes read the 4-bit graph alike


def test_ptq_refuses_widths_onnxruntime_lacks(digits_teacher) -> None:
    teacher, train, _ = digits_teacher
    with pytest.raises(ArchnetError, match="activations at 8 or 4 bits"):
        ptq_onnxruntime(teacher, train.images[:8], (8, 3, SIZE, SIZE), bits=(4, 2))
    with pytest.raises(ArchnetError, match="weight bits"):
        ptq_onnxruntime(teacher, train.images[:8], (8, 3, SIZE, SIZE), bits=(1, 8))
    with pytest.raises(ArchnetError, match="calibrate_method"):
        ptq_onnxruntime(teacher, train.images[:8], (8, 3, SIZE, SIZE), calibrate_method="mse")


def test_saturation_probe_answer() -> None:
    """The probe's graph as written gives its stated answer; a 16-bit pair sum could not."""
    model, x, exact = _saturation_probe()
    session = ort_session(model, optimize=False)
    (y,) = session.run(None, {"x": x})
    assert np.all(y == 127 * 1024)
    assert exact == 127 * 1024
    pair = min(2 * 255 * 127, 2**15 - 1)  # what a saturating kernel adds per pair
    assert round(2 * pair / 1024) * 1024 != exact


def test_onnx_top1_pads_the_last_batch() -> None:
    net = _net().eval()
    x = torch.randn(21, 3, SIZE, SIZE)
    with torch.no_grad():
        pred = net(x).argmax(1)
    labels = pred.clone()
    labels[:7] = (labels[:7] + 1) % 10  # exactly 7 of 21 wrong
    proto = export_onnx(net, (8, 3, SIZE, SIZE))
    assert onnx_top1(proto, x, labels) == pytest.approx(100 * 14 / 21)
    assert onnx_top1(proto, x, pred) == pytest.approx(100.0)


def _kd(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kd_kl(student.eval()(x), teacher(x), 2.0))


def test_lsq_qat_quantizes_trains_and_exports(digits_teacher, tmp_path) -> None:
    teacher, train, held = digits_teacher
    images = train.images
    cfg = FinetuneConfig(epochs=2, batch_size=64, lr=3e-3)
    bits, first_last = (2, 3), (8, 8)
    # the starting point lsq_qat trains from: folded, quantized, calibrated
    start = prepare_qat(copy.deepcopy(teacher), QuantConfig(*bits, first_last), images[:256])
    steps: list[float] = []
    student = lsq_qat(teacher, images, bits, first_last, cfg, on_step=steps.append)

    assert not student.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    layers = [m for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(m, QuantModule) for m in layers)
    got = [(m.weight_bits, m.act_bits) for m in layers]
    assert got[0] == first_last and got[-1] == first_last
    assert all(b == bits for b in got[1:-1])
    assert len(steps) == 2 * -(-len(images) // 64)
    assert _kd(student, teacher, held.images) < 0.5 * _kd(start, teacher, held.images)
    # the teacher itself is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    assert not any(isinstance(m, QuantModule) for m in teacher.modules())

    proto = export_qdq(student, (4, 3, SIZE, SIZE), path=tmp_path / "qat.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    x = held.images[:4]
    session = ort_session(proto, optimize=False)  # the graph as written, no fused kernels
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = student(x).numpy()
    assert np.abs(out - ref).max() <= output_step(student)


def test_lsq_qat_without_first_last(digits_teacher) -> None:
    teacher, train, _ = digits_teacher
    cfg = FinetuneConfig(epochs=1, batch_size=32)
    student = lsq_qat(teacher, train.images[:32], (4, 4), None, cfg)
    bits = {(m.weight_bits, m.act_bits) for m in student.modules() if isinstance(m, QuantModule)}
    assert bits == {(4, 4)}
