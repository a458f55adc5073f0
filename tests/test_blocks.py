"""Block discovery (patterns, tracing, shapes) and the on-disk teacher feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from archnet.blocks import BlockSpec, find_blocks, match_name
from archnet.errors import ArchnetError
from archnet.features import FeatureCache
from archnet.zoo import create_model


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so blocks are far from identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


def _hooked_calls(
    model: nn.Module, names: list[str], x: torch.Tensor
) -> tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Call order and (input, output) of the named submodules, captured independently."""
    order: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)

        def pre(_m, args, name=name):
            inputs[name] = args[0].detach().clone()

        def post(_m, _args, out, name=name):
            order.append(name)
            seen[name] = (inputs[name], out.detach().clone())

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return order, seen


# ---------------------------------------------------------------------------- match_name


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("layer1.0", "layer*.*", True),
        ("layer4.12", "layer*.*", True),
        ("layer1.0.conv1", "layer*.*", False),  # deeper than the pattern
        ("layer1", "layer*.*", False),  # shallower than the pattern
        ("blocks.3", "blocks.*", True),
        ("blocks.3.conv", "blocks.*", False),
        ("stages.1.blocks.2", "stages.*.blocks.*", True),
        ("stages.1.downsample.0", "stages.*.blocks.*", False),
        ("s1.b1", "s[0-9].b[0-9]*", True),
        ("s1.b12", "s[0-9].b[0-9]*", True),
        ("stem.conv", "s[0-9].b[0-9]*", False),
        ("head", "*", True),
        ("head.fc", "*", False),
    ],
)
def test_match_name_is_dot_aware(name: str, pattern: str, expected: bool) -> None:
    assert match_name(name, pattern) is expected


# ------------------------------------------------------------------------- zoo teachers


@pytest.mark.parametrize(
    ("model_name", "expected_names"),
    [
        ("tiny_effnet", [f"blocks.{i}" for i in range(8)]),
        ("tiny_resnet", [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1)]),
    ],
)
def test_find_blocks_on_zoo_models(model_name: str, expected_names: list[str]) -> None:
    model = create_model(model_name)
    specs = find_blocks(model, (3, 32, 32))
    assert [s.name for s in specs] == expected_names
    order, seen = _hooked_calls(model, expected_names, torch.randn(1, 3, 32, 32))
    assert [s.name for s in specs] == order  # call order
    for s in specs:
        x, y = seen[s.name]
        assert s.in_shape == tuple(x.shape[1:])
        assert s.out_shape == tuple(y.shape[1:])
    # consecutive blocks chain: each block's input is the previous block's output
    for a, b in zip(specs, specs[1:], strict=False):
        assert a.out_shape == b.in_shape


def test_find_blocks_tiny_resnet_strides() -> None:
    specs = find_blocks(create_model("tiny_resnet"), (3, 32, 32))
    assert [s.stride for s in specs] == [1, 1, 2, 1, 2, 1]
    assert specs[2].in_shape == (16, 16, 16) and specs[2].out_shape == (32, 8, 8)


# ------------------------------------------------------------------------ timm families


@pytest.mark.parametrize(
    ("model_name", "count", "first", "first_in", "pattern"),
    [
        ("resnet18", 8, "layer1.0", (64, 16, 16), "layer*.*"),
        ("efficientnet_b0", 16, "blocks.0.0", (32, 32, 32), "blocks.*.*"),
        ("convnext_atto", 12, "stages.0.blocks.0", (40, 16, 16), "stages.*.blocks.*"),
        ("regnetx_002", 13, "s1.b1", (32, 32, 32), "s[0-9].b[0-9]*"),
    ],
)
def test_find_blocks_on_timm_models(
    model_name: str, count: int, first: str, first_in: tuple[int, ...], pattern: str
) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name)
    specs = find_blocks(model, (3, 64, 64))
    names = [s.name for s in specs]
    assert len(specs) == count
    assert names[0] == first
    assert specs[0].in_shape == first_in
    assert all(match_name(n, pattern) for n in names)
    assert len(set(names)) == count
    # call order: network depth only grows, ending at stride 32 (2x2 for a 64x64 input)
    assert [s.out_shape[1] for s in specs] == sorted((s.out_shape[1] for s in specs), reverse=True)
    assert specs[-1].out_shape[1:] == (2, 2)
    assert names == sorted(names, key=lambda n: [int(c) for c in n if c.isdigit()])


# ---------------------------------------------------------------------- explicit patterns


def test_explicit_pattern_overrides_detection() -> None:
    model = create_model("tiny_resnet")
    stages = find_blocks(model, (3, 32, 32), "layer*")
    assert [s.name for s in stages] == ["layer1", "layer2", "layer3"]
    assert stages[0].in_shape == (16, 16, 16) and stages[-1].out_shape == (64, 4, 4)
    # several comma-separated patterns come back in call order, not pattern order
    picked = find_blocks(model, (3, 32, 32), " layer3.1 , layer1.0")
    assert [s.name for s in picked] == ["layer1.0", "layer3.1"]
    assert find_blocks(model, (3, 32, 32), ["layer2.*"])[0].name == "layer2.0"


def test_explicit_pattern_matching_nothing_mentions_blocks_option() -> None:
    with pytest.raises(ArchnetError, match="--blocks"):
        find_blocks(create_model("tiny_resnet"), (3, 32, 32), "nothing.*")


class _Twice(nn.Module):
    """Each block is called twice per forward, so none can be replaced alone."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(b(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "shape"),
    [(nn.Conv2d(3, 8, 3), (3, 16, 16)), (_Twice(), (4, 8, 8))],
    ids=["single-conv", "blocks-called-twice"],
)
def test_no_blocks_raises_with_hint(model: nn.Module, shape: tuple[int, ...]) -> None:
    with pytest.raises(ArchnetError, match="--blocks"):
        find_blocks(model, shape)


def test_explicit_pattern_on_blocks_called_twice_raises() -> None:
    with pytest.raises(ArchnetError, match="--blocks"):
        find_blocks(_Twice(), (4, 8, 8), "blocks.*")


# ----------------------------------------------------------------------------- BlockSpec


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "stride"),
    [
        ((16, 16, 16), (16, 16, 16), 1),
        ((16, 16, 16), (32, 8, 8), 2),
        ((8, 12, 12), (8, 3, 3), 4),
        ((16, 16, 16), (16, 5, 5), 0),  # not an integer factor
        ((16, 16, 16), (16, 8, 4), 0),  # height and width shrink differently
        ((16, 8, 8), (16, 16, 16), 0),  # up-sampling
        ((16, 4, 4), (16, 0, 0), 0),
        ((64,), (32,), 1),  # no spatial dimensions
    ],
)
def test_blockspec_stride(in_shape, out_shape, stride) -> None:
    spec = BlockSpec("b", in_shape, out_shape)
    assert spec.stride == stride
    assert spec.in_ch == in_shape[0] and spec.out_ch == out_shape[0]
    assert spec.same_shape == (in_shape == out_shape)


# -------------------------------------------------------------------------- FeatureCache


def test_feature_cache_matches_hooked_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(create_model("tiny_resnet"))
    specs = find_blocks(model, (3, 32, 32))
    images = torch.randn(20, 3, 32, 32)
    cache = FeatureCache(tmp_path / "features")
    assert not cache.exists("train", len(specs))

    cache.write(model, specs, images, "train", batch_size=8)  # ragged last batch
    assert cache.exists("train", len(specs))
    assert not cache.exists("heldout", len(specs))
    assert not list((tmp_path / "features" / "train").glob("*.tmp.npy"))

    _, seen = _hooked_calls(model, [s.name for s in specs], images)
    for i, s in enumerate(specs):
        x, y = cache.block("train", i)
        assert x.dtype == np.float16 and y.dtype == np.float16
        assert x.shape == (20, *s.in_shape) and y.shape == (20, *s.out_shape)
        ref_x, ref_y = (t.numpy() for t in seen[s.name])
        np.testing.assert_allclose(x.astype(np.float32), ref_x, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(y.astype(np.float32), ref_y, rtol=2e-3, atol=2e-3)
        assert not np.allclose(x[:, :1].astype(np.float32), 0)  # real features, not zeros

    with torch.no_grad():
        expected = model(images).numpy()
    logits = cache.load("train", "logits")
    assert logits.shape == (20, 10)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_feature_cache_exists_needs_every_file(tmp_path: Path) -> None:
    model = create_model("tiny_resnet")
    specs = find_blocks(model, (3, 16, 16))
    cache = FeatureCache(tmp_path)
    cache.write(model, specs, torch.randn(4, 3, 16, 16), "heldout")
    assert cache.exists("heldout", len(specs))
    cache.path("heldout", "002_out").unlink()
    assert not cache.exists("heldout", len(specs))


class _InPlaceBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)  # modifies its own input
        return self.conv(x)


class _InPlaceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_InPlaceBlock(), _InPlaceBlock())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


def test_feature_cache_input_is_recorded_before_the_block_runs(tmp_path: Path) -> None:
    model = _InPlaceNet()
    specs = find_blocks(model, (4, 8, 8))
    images = torch.randn(6, 4, 8, 8)
    FeatureCache(tmp_path).write(model, specs, images.clone(), "train")
    x, _ = FeatureCache(tmp_path).block("train", 0)
    np.testing.assert_allclose(x.astype(np.float32), images.numpy(), rtol=2e-3, atol=2e-3)


def test_spec_round_trips_and_old_runs_read_as_nchw():
    from archnet.context import ContextInput

    spec = BlockSpec(
        "layers.0",
        (12, 16),
        (12, 16),
        "tokens",
        (ContextInput("src_mask"), ContextInput("is_causal", tensor=False)),
        2,
    )
    assert BlockSpec.from_dict(spec.to_dict()) == spec
    old = {"name": "layer1.0", "in_shape": [16, 8, 8], "out_shape": [32, 4, 4]}
    assert BlockSpec.from_dict(old) == BlockSpec("layer1.0", (16, 8, 8), (32, 4, 4))
    assert BlockSpec.from_dict(old).stride == 2


def test_nhwc_spec_reads_channels_and_stride_from_the_last_and_first_axes():
    spec = BlockSpec("s", (8, 8, 16), (4, 4, 32), "nhwc")
    assert (spec.in_ch, spec.out_ch, spec.stride) == (16, 32, 2)
    assert spec.channels_first() == BlockSpec("s", (16, 8, 8), (32, 4, 4))


def test_conv1d_blocks_read_as_channels_first_maps():
    model = nn.Sequential(
        nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU()),
        nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.ReLU()),
    )
    specs = find_blocks(model, (1, 64))
    assert [s.layout for s in specs] == ["ncl"] * 3
    assert (specs[1].in_ch, specs[1].in_shape) == (8, (8, 64))


def test_ncl_stride_is_the_length_factor():
    assert BlockSpec("b", (8, 64), (16, 32), "ncl").stride == 2
    assert BlockSpec("b", (8, 64), (8, 64), "ncl").stride == 1
    assert BlockSpec("b", (8, 64), (8, 24), "ncl").stride == 0
    assert BlockSpec("b", (17, 32), (17, 64), "tokens").stride == 1


# ------------------------------------ families found by the HRNet pattern and the generic rule


@pytest.mark.parametrize(
    ("model_name", "count", "first", "last"),
    [
        ("vgg11", 6, "features.0", "pre_logits"),  # 5 pooled stages and the conv MLP
        ("dpn48b", 17, "features.conv1_1", "features.conv5_3"),  # the generic rule
        ("hrnet_w18_small", 27, "layer1.0", "incre_modules.3"),  # branches and transitions
    ],
)
def test_families_without_a_plain_pattern(model_name, count, first, last) -> None:
    model = timm.create_model(model_name, num_classes=10).eval()
    specs = find_blocks(model, (3, 64, 64))
    assert (len(specs), specs[0].name, specs[-1].name) == (count, first, last)
    if model_name == "hrnet_w18_small":
        assert sum(".branches." in s.name for s in specs) == 18
        assert all(s.context == () and s.out_arity == 0 for s in specs)  # tensor to tensor


def test_training_reads_block_outputs_not_what_an_in_place_relu_made_of_them() -> None:
    from archnet.distill.finetune import FinetuneConfig, finetune

    def net() -> nn.Module:
        torch.manual_seed(0)
        block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        return nn.Sequential(block, nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))

    teacher, student = net(), net()
    teacher(torch.randn(1, 3, 4, 4))
    student(torch.randn(1, 3, 4, 4))
    seen = []
    student[0].register_forward_hook(lambda _m, _a, out: seen.append(out))
    cfg = FinetuneConfig(epochs=1, batch_size=4, feature_weight=1.0, shift=0)
    finetune(student, teacher.eval(), torch.randn(4, 3, 4, 4), cfg, ["0"])
    assert (seen[0] < 0).any()  # the block's own output, not overwritten by the ReLU after it
    assert not any(getattr(m, "inplace", False) for m in [*student.modules(), *teacher.modules()])
