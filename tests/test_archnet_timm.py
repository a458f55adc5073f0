"""Arch-Net mode on real timm architectures (random weights, tiny settings): every student
exports to ONNX with zero violations of archnet-5op and runs in onnxruntime."""

import onnx
import pytest
import timm
import torch

from archnet import ConvertConfig, convert, load_target
from archnet.onnx_utils import ort_session
from archnet.targets import check_model


def tiny_archnet_config(name: str) -> ConvertConfig:
    cfg = ConvertConfig(model=f"timm:{name}", candidates="archnet_conv", selection_fraction=0.25)
    cfg.blockwise.epochs, cfg.blockwise.batch_size = 1, 8
    cfg.arch.epochs_per_stage, cfg.arch.global_epochs, cfg.arch.batch_size = 0.1, 1, 8
    cfg.latency.warmup, cfg.latency.repeats, cfg.latency.rounds = 1, 3, 1
    return cfg


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100"])
def test_timm_model_converts_to_zero_violation_onnx(name, tmp_path):
    torch.manual_seed(0)
    teacher = timm.create_model(name, pretrained=False, num_classes=10).eval()
    images = torch.randn(16, 3, 64, 64)
    result = convert(
        teacher,
        images,
        target="archnet-5op",
        budget="100",
        out=tmp_path / name,
        config=tiny_archnet_config(name),
    )
    model = onnx.load(str(result.run_dir / "student.onnx"))
    assert check_model(model, load_target("archnet-5op")) == []
    out = ort_session(model).run(None, {"input": images[:1].numpy()})[0]
    assert out.shape == (1, 10)
    # the teacher itself is not compliant: the conversion did real work
    assert check_model(onnx.load(str(result.run_dir / "teacher.onnx")), load_target("archnet-5op"))
