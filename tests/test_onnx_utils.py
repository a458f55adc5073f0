"""ONNX export and onnxruntime agree with PyTorch."""

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from archnet.errors import ArchnetError
from archnet.onnx_utils import (
    ExportMismatchError,
    check_against_torch,
    export_onnx,
    ort_session,
)


def block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
    )


def test_export_matches_torch(tmp_path: Path) -> None:
    net = block().train()
    path = tmp_path / "out" / "block.onnx"
    model = export_onnx(net, (2, 3, 16, 16), path=path)
    assert net.training  # caller's mode is restored
    assert path.is_file()
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    diff = check_against_torch(net, model, torch.randn(2, 3, 16, 16), rtol=1e-4, atol=1e-4)
    assert diff < 1e-4
    saved = onnx.load(str(path))
    assert saved.graph.node[0].op_type == model.graph.node[0].op_type


@pytest.mark.parametrize("source", ["proto", "bytes", "path"])
def test_ort_session_accepts_all_sources(tmp_path: Path, source: str) -> None:
    model = export_onnx(block(), (1, 3, 8, 8), path=tmp_path / "m.onnx")
    arg = {"proto": model, "bytes": model.SerializeToString(), "path": tmp_path / "m.onnx"}
    session = ort_session(arg[source], threads=1)
    (out,) = session.run(None, {"input": torch.randn(1, 3, 8, 8).numpy()})
    assert out.shape == (1, 16, 1, 1)


def test_ort_session_bad_device() -> None:
    model = export_onnx(nn.Identity(), (1, 2))
    with pytest.raises(ArchnetError, match="device"):
        ort_session(model, device="tpu")


def test_mismatch_is_detected() -> None:
    net = block()
    model = export_onnx(net, (1, 3, 8, 8))
    with torch.no_grad():
        net[0].bias.add_(1.0)
    with pytest.raises(ExportMismatchError):
        check_against_torch(net, model, torch.randn(1, 3, 8, 8), rtol=1e-4, atol=1e-4)
