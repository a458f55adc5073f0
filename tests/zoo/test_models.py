"""Every bundled teacher runs, exports to ONNX faithfully, and exposes distillable blocks."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from archnet.errors import ArchnetError
from archnet.zoo import create_model, list_models


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's replaceable blocks: children of `blocks`, or of `layer1..layerN`."""
    if hasattr(model, "blocks"):
        return [(f"blocks.{n}", m) for n, m in model.blocks.named_children()]
    stages = [n for n, _ in model.named_children() if n.startswith("layer")]
    return [(f"{s}.{n}", m) for s in stages for n, m in getattr(model, s).named_children()]


def test_registry_lists_the_teachers():
    assert {"tiny_effnet", "tiny_resnet"} <= set(list_models())


def test_unknown_model_is_a_user_error():
    with pytest.raises(ArchnetError, match="tiny_effnet"):
        create_model("no_such_net")


@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name):
    model = create_model(name, num_classes=10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert create_model(name, num_classes=7).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("name", list_models())
def test_blocks_are_single_tensor_modules(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    blocks = _blocks(model)
    assert len(blocks) >= 6
    seen: dict[str, tuple[int, int]] = {}

    def hook(name):
        def fn(_m, args, out):
            assert len(args) == 1 and isinstance(args[0], torch.Tensor)
            assert isinstance(out, torch.Tensor)
            seen[name] = (seen.get(name, (0, 0))[0] + 1, out.ndim)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in blocks]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    ndim = 3 if name == "tiny_vit" else 4  # (B, N, C) tokens, else (B, C, H, W)
    assert seen == {n: (1, ndim) for n, _ in blocks}


def test_tiny_effnet_layout():
    model = create_model("tiny_effnet")
    kinds = [type(m).__name__ for m in model.blocks]
    assert len(kinds) >= 8 and "ConvNeXtBlock" in kinds
    assert any(isinstance(m, nn.LayerNorm) for m in model.blocks.modules())
    k5 = [m for m in model.blocks.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (5, 5)]
    assert len(k5) >= 3
    x = torch.randn(1, 3, 32, 32)
    spatial = []
    with torch.no_grad():
        x = model.act1(model.bn1(model.conv_stem(x)))
        for block in model.blocks:
            x = block(x)
            spatial.append(x.shape[-1])
    assert sorted(set(spatial), reverse=True) == [16, 8, 4, 2]


def _export(model: nn.Module, x: torch.Tensor, path) -> None:
    kwargs = {"input_names": ["x"], "output_names": ["y"], "opset_version": 17}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    torch.onnx.export(model, (x,), str(path), **kwargs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", list_models())
def test_onnx_export_matches_pytorch(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(name).eval()
    # Non-trivial BN statistics and affine terms, so the check covers them.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(1, 3, 32, 32)
    _export(model, x, tmp_path / f"{name}.onnx")
    sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
