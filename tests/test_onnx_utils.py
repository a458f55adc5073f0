"""ONNX export and onnxruntime agree with PyTorch."""

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from archnet import onnx_utils
from archnet.errors import ArchnetError
from archnet.onnx_utils import (
    ExportMismatchError,
    check_against_torch,
    common_exporter,
    export_onnx,
    exporter_of,
    legacy_exporter_available,
    ort_session,
    uniform_exporters,
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


def test_export_records_exporter_and_opset(tmp_path: Path) -> None:
    """The tag names the exporter that ran first in the chain and survives saving."""
    model = export_onnx(block(), (1, 3, 8, 8), path=tmp_path / "m.onnx")
    first = "torchscript/opset17" if legacy_exporter_available() else "dynamo/opset17"
    assert exporter_of(model) == first
    assert exporter_of(onnx.load(str(tmp_path / "m.onnx"))) == first
    assert exporter_of(onnx.helper.make_model(model.graph)) is None  # no tag: not ours


def _refusing(exporter, refuse):  # noqa: ANN001, ANN202
    """``exporter`` that raises where ``refuse(module, opset)``; records every call."""

    def export(module, x, opset):  # noqa: ANN001, ANN202
        calls.append(opset)
        if refuse(module, opset):
            raise RuntimeError("refused for the test")
        return exporter(module, x, opset)

    calls: list[int] = []
    export.calls = calls
    return export


def test_fallback_and_opset_bump_are_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchScript fails, then dynamo at 17: the model says it is dynamo at opset 18."""
    real = dict(onnx_utils._EXPORTERS)
    torchscript = _refusing(real["torchscript"], lambda m, opset: True)
    dynamo = _refusing(real["dynamo"], lambda m, opset: opset < 18)
    monkeypatch.setitem(onnx_utils._EXPORTERS, "torchscript", torchscript)
    monkeypatch.setitem(onnx_utils._EXPORTERS, "dynamo", dynamo)
    monkeypatch.setattr(onnx_utils, "legacy_exporter_available", lambda: True)
    model = export_onnx(nn.Identity(), (1, 2))
    assert torchscript.calls == [17] and dynamo.calls == [17, 18]
    assert exporter_of(model) == "dynamo/opset18"
    assert {op.version for op in model.opset_import if op.domain == ""} == {18}


def test_forced_exporter_is_used_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    real = dict(onnx_utils._EXPORTERS)
    torchscript = _refusing(real["torchscript"], lambda m, opset: False)
    dynamo = _refusing(real["dynamo"], lambda m, opset: False)
    monkeypatch.setitem(onnx_utils._EXPORTERS, "torchscript", torchscript)
    monkeypatch.setitem(onnx_utils._EXPORTERS, "dynamo", dynamo)
    model = export_onnx(nn.Identity(), (1, 2), exporter="dynamo/opset18")
    assert torchscript.calls == [] and dynamo.calls == [18]
    assert exporter_of(model) == "dynamo/opset18"
    refused = _refusing(real["dynamo"], lambda m, opset: True)
    monkeypatch.setitem(onnx_utils._EXPORTERS, "dynamo", refused)
    with pytest.raises(RuntimeError, match="refused"):
        export_onnx(nn.Identity(), (1, 2), exporter="dynamo/opset18")
    assert torchscript.calls == []  # a forced exporter has no fallback
    with pytest.raises(ArchnetError, match="unknown ONNX exporter"):
        export_onnx(nn.Identity(), (1, 2), exporter="tensorrt/opset17")


@pytest.mark.parametrize(
    ("tags", "common"),
    [
        (["torchscript/opset17"], "torchscript/opset17"),
        (["torchscript/opset17", "dynamo/opset17"], "dynamo/opset17"),
        (["torchscript/opset17", "dynamo/opset18"], "dynamo/opset18"),
        (["torchscript/opset18", "dynamo/opset17"], "dynamo/opset18"),
    ],
)
def test_common_exporter_is_the_latest_fallback(tags: list[str], common: str) -> None:
    assert common_exporter(tags) == common
    assert uniform_exporters(tags)[0] == common


def test_uniform_exporters_continue_down_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_utils, "legacy_exporter_available", lambda: True)
    assert uniform_exporters(["torchscript/opset17", "dynamo/opset17"]) == [
        "dynamo/opset17",
        "dynamo/opset18",
    ]
    assert uniform_exporters(["torchscript/opset17", "dynamo/opset18"]) == ["dynamo/opset18"]
    with pytest.raises(ArchnetError, match="no exporter"):
        common_exporter([])


class _Scaled(nn.Module):
    """Two inputs, one of them integer ids, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(ids)
        return e + x, e.sum(-1)


def test_export_from_example_inputs_with_names_and_dynamic_axes() -> None:
    net, ids, x = _Scaled(), torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 4)
    names = onnx_utils.OnnxIO(
        inputs=("ids", "x"),
        outputs=("sum", "total"),
        dynamic_axes={"ids": {0: "b"}, "x": {0: "b"}, "sum": {0: "b"}, "total": {0: "b"}},
    )
    model = export_onnx(net, args=(ids, x), names=names)
    assert [i.name for i in model.graph.input] == ["ids", "x"]
    assert [o.name for o in model.graph.output] == ["sum", "total"]
    ids2, x2 = torch.tensor([[4, 5, 6], [7, 8, 9]]), torch.randn(2, 3, 4)  # another batch size
    got = ort_session(model).run(["sum", "total"], {"ids": ids2.numpy(), "x": x2.numpy()})
    with torch.no_grad():
        ref = net(ids2, x2)
    assert all(abs(g - r.numpy()).max() < 1e-5 for g, r in zip(got, ref))
    with pytest.raises(ArchnetError, match="either"):
        export_onnx(net, (1, 3), args=(ids, x), names=names)
