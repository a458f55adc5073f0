"""A timm ViT converted end to end: HANT on cpu-ort, Arch-Net on archnet-transformer (W4A4)."""

from __future__ import annotations

import onnx

from archnet import convert
from archnet.zoo import evaluate
from tests.conftest import tiny_config

REMOVED = {"LayerNormalization", "Gelu", "Erf"}


def test_the_vit_teacher_learned(tiny_vit_teacher, tiny_eval):
    assert evaluate(tiny_vit_teacher, tiny_eval) > 70.0  # ten classes: chance is 10%


def test_hant_cuts_vit_blocks(tmp_path, tiny_vit_teacher, tiny_images, tiny_eval):
    cfg = tiny_config(model="zoo:tiny_vit", candidates="tf_*,skip,linear")
    result = convert(
        tiny_vit_teacher,
        tiny_images,
        "cpu-ort",
        budget=0.7,
        out=tmp_path / "h",
        eval_data=tiny_eval,
        config=cfg,
    )
    rep = result.report
    assert rep["mode"] == "hant"
    chosen = [row["choice"] for row in rep["blocks"]]
    assert any(c != "teacher" for c in chosen), chosen
    assert rep["student"]["latency_ms"] > 0 and rep["student"]["macs"] < rep["teacher"]["macs"]


def test_arch_net_w4a4_vit_has_no_layer_norm_and_passes_the_check(
    tmp_path, tiny_vit_teacher, digits_data, tiny_eval
):
    cfg = tiny_config(model="zoo:tiny_vit", candidates="archnet_tf", bits="w4a4")
    cfg.blockwise.epochs, cfg.arch.epochs_per_stage, cfg.arch.global_epochs = 4, 1.0, 4
    images = digits_data[1].images[112:512]  # BatchNorm for LayerNorm needs more than 48 images
    result = convert(
        tiny_vit_teacher,
        images,
        "archnet-transformer",
        budget=4.0,
        out=tmp_path / "a",
        eval_data=tiny_eval,
        config=cfg,
    )
    rep = result.report
    assert rep["mode"] == "archnet" and rep["onnx"]["student_violations"] == 0
    assert rep["onnx"]["student_unverified"] == 0
    proto = onnx.load(tmp_path / "a" / "student.onnx")
    ops = {n.op_type for n in proto.graph.node}
    assert not REMOVED & ops and "QuantizeLinear" in ops
    teacher_ops = {n.op_type for n in onnx.load(tmp_path / "a" / "teacher.onnx").graph.node}
    assert "LayerNormalization" in teacher_ops  # the check could have found them
    # the restricted, quantized student still predicts (W4A4 at width 32 costs ~20 points)
    assert rep["student"]["top1"] > 0.6 * rep["teacher"]["top1"]
