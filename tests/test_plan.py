"""`archnet plan` and the pre-flight check: blocks, candidates, shell rewrites judged exact or
approximate against the teacher's own layers, and what no rewrite handles, named in seconds;
a conversion that would fail at its final check is refused before any training."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from torch import nn

from archnet import convert
from archnet.blocks import find_blocks
from archnet.cli import main
from archnet.errors import ArchnetError
from archnet.plan import plan_conversion, preflight
from archnet.targets import load_target
from archnet.zoo.timm_families import FAMILIES, GLUE_LEFT, NO_BLOCKS
from tests.conftest import tiny_config

TARGET = load_target("archnet-5op")


def test_plan_of_resnet18_judges_each_rewrite():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    specs = find_blocks(model, (3, 32, 32))
    plan = plan_conversion(model, specs, TARGET, "archnet", (1, 3, 32, 32))
    assert plan.ok and len(plan.blocks) == 8
    assert all(n > 0 for n in plan.candidates.values())
    how = {r.module: r.exact for r in plan.rewrites}
    assert how == {"conv1": True, "maxpool": False}  # 7x7 factorised exactly; 3x3 pool is not


class ProductStem(nn.Module):
    """Two parallel convs multiplied in the module's own forward: glue no exact rewrite makes
    of layers (a sum would be: ``archnet.glue``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.a(x) * self.b(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


def _glued() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        ProductStem(),
        nn.ReLU(),
        nn.Sequential(Block(), Block()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def test_what_no_rewrite_handles_is_named():
    model = _glued()
    specs = find_blocks(model, (3, 16, 16), "2.*")
    plan = plan_conversion(model, specs, TARGET, "archnet", (1, 3, 16, 16), count_candidates=False)
    assert not plan.ok
    assert any("(Mul)" in line and "[from 0]" in line for line in plan.left)
    assert not any(f"[from {s.name}" in line for s in specs for line in plan.left)  # stubs
    with pytest.raises(ArchnetError, match=r"\(Mul\).*--blocks"):
        preflight(model, specs, TARGET, (1, 3, 16, 16))


def test_conversion_is_refused_before_any_training(tmp_path, tiny_images):
    images = torch.nn.functional.interpolate(tiny_images[:16], size=16)
    begin = time.perf_counter()
    with pytest.raises(ArchnetError, match="outside the blocks"):
        cfg = tiny_config(blocks="2.*")
        convert(_glued(), images, "archnet-5op", out=tmp_path / "run", config=cfg)
    assert time.perf_counter() - begin < 60
    assert not (tmp_path / "run" / "features").exists()


def test_plan_command(capsys):
    args = ["plan", "--model", "tests.test_plan:_glued", "--input-size", "3,16,16"]
    assert main([*args, "--blocks", "2.*", "--candidates", "skip"]) == 1
    out = capsys.readouterr().out
    assert "(Mul) [from 0]" in out and "1 node(s) left" in out
    for name in ("repvgg_a0", "cspresnet50"):  # a branch-sum stem, cross-stage splits: exact
        args = ["plan", "--model", f"timm:{name}", "--input-size", "3,32,32"]
        assert main([*args, "--candidates", "skip"]) == 0
        out = capsys.readouterr().out
        assert "exact" in out and "nothing left outside the blocks" in out


# timm CNN families, random weights, 64x64: within a minute, a plan either leaves nothing
# outside the blocks or is refused naming why (the list and its pins: archnet.zoo.timm_families)


@pytest.mark.parametrize("name", FAMILIES)
def test_plan_over_timm_families(name, record_property):
    torch.manual_seed(0)
    begin = time.perf_counter()
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    if name in NO_BLOCKS:  # refused at once, asking for --blocks
        with pytest.raises(ArchnetError, match="--blocks"):
            find_blocks(model, (3, 64, 64))
        return
    specs = find_blocks(model, (3, 64, 64))
    plan = plan_conversion(model, specs, TARGET, "archnet", (1, 3, 64, 64), count_candidates=False)
    assert time.perf_counter() - begin < 60
    if name in GLUE_LEFT:  # blocks found, glue the target cannot run named
        assert not plan.ok and any(GLUE_LEFT[name] in line for line in plan.left)
        return
    # every other family's shell converts whole; a node left would be named with its module
    assert plan.ok, plan.left
    record_property("outcome", f"{len(specs)} blocks, {len(plan.rewrites)} rewrites")


PLUGIN = '''
import torch
from torch import nn

from archnet.opconvert import register_converter


@register_converter("ProductStem")
def one_conv(stem):
    """a(x) * b(x) of two convs, approximated by the first conv alone."""
    conv = nn.Conv2d(stem.a.in_channels, stem.a.out_channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(stem.a.weight)
        conv.bias.copy_(stem.a.bias)
    return conv
'''


def test_a_plugin_converter_is_used_like_a_built_in_one(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_converters.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["plan", "--model", "tests.test_plan:_glued", "--input-size", "3,16,16"]
    args += ["--blocks", "2.*", "--candidates", "skip"]
    assert main([*args, "--plugin", "my_converters"]) == 0
    out = capsys.readouterr().out
    assert "approximate" in out and "nothing left outside the blocks" in out
    assert main([*args, "--plugin", "no_such_module"]) == 2
    assert "--plugin no_such_module cannot be imported" in capsys.readouterr().err
