"""``archnet_teacher``: the teacher's block converted as the shell is; on a trained ResNet and
RepVGG it computes what the teacher's block computes, in archnet-5op's operators only."""

from __future__ import annotations

import timm
import torch

from archnet.blocks import find_blocks
from archnet.candidates import build_candidate
from archnet.targets import load_target, rejects

TARGET = load_target("archnet-5op")


def _check(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    specs = find_blocks(model, shape)
    assert specs
    for spec in specs:
        block = model.get_submodule(spec.name)
        assert rejects(TARGET, block, (1, *spec.in_shape)) is not None  # Add, 1x1 convs...
        kept = build_candidate("archnet_teacher", spec, block)
        assert rejects(TARGET, kept, (1, *spec.in_shape)) is None, spec.name
        x = torch.randn(3, *spec.in_shape)
        with torch.no_grad():
            ref = block.eval()(x)
            err = (kept.eval()(x) - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, (spec.name, float(err))


def test_a_trained_resnet_block_is_kept_exactly(tiny_teacher):
    _check(tiny_teacher.eval(), (3, 32, 32))  # residual adds and a downsampling shortcut


def test_repvgg_blocks_are_kept_exactly():
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", num_classes=10).eval()
    with torch.no_grad():  # statistics of their own, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    _check(model, (3, 32, 32))
