"""Blocks called with context (masks, flags) and in other layouts: traced, cached, replayed."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from archnet.blocks import find_blocks
from archnet.candidates import build_pool
from archnet.context import call_block
from archnet.features import FeatureCache

torch.set_num_threads(1)


class MaskedEncoder(nn.Module):
    """A causal Transformer encoder whose padding mask follows the data, as a user's own
    sequence model would call ``nn.TransformerEncoder``."""

    def __init__(self, width: int = 16, length: int = 12) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).triu(1))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = x[..., 0] > 1.2  # per sample: positions this sequence masks out
        padding[:, 0] = False
        h = self.encoder(x, mask=self.causal, src_key_padding_mask=padding, is_causal=True)
        return self.head(h.mean(1))


class LoopedEncoder(nn.Module):
    """Encoder layers called in a loop with keyword masks, as Hugging Face models call theirs."""

    def __init__(self, width: int = 16, length: int = 12, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
            for _ in range(depth)
        )
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).triu(1))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = x[..., 0] > 1.2
        padding[:, 0] = False
        for layer in self.layers:
            x = layer(x, src_mask=self.causal, src_key_padding_mask=padding, is_causal=True)
        return self.head(x.mean(1))


def _replay_gap(model: nn.Module, specs, images: torch.Tensor, tmp_path) -> dict[str, float]:
    """Per block: max |cached teacher output - the block run alone on its cached input and
    context|, relative to the output's scale."""
    cache = FeatureCache(tmp_path)
    cache.write(model, specs, images, "train", batch_size=3)
    gaps = {}
    for i, spec in enumerate(specs):
        x, y = cache.block("train", i)
        context = cache.context("train", i, spec).batch(list(range(len(x))))
        block = model.get_submodule(spec.name).eval()
        with torch.no_grad():
            out = call_block(block, torch.from_numpy(x.astype("float32")), context)
        y = torch.from_numpy(y.astype("float32"))
        gaps[spec.name] = float((out - y).abs().max() / y.abs().max().clamp_min(1e-6))
    return gaps


def test_masked_encoder_layers_replay_with_their_context(tmp_path) -> None:
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    specs = find_blocks(model, (12, 16), "encoder.layers.*")
    assert [s.layout for s in specs] == ["tokens"] * 3
    context = {c.name: c.per_sample for c in specs[0].context}
    assert context == {"src_mask": False, "src_key_padding_mask": True, "is_causal": False}
    images = torch.randn(7, 12, 16)
    gaps = _replay_gap(model, specs, images, tmp_path)
    assert max(gaps.values()) < 5e-3, gaps  # fp16 cache
    # without its context the same block computes something else: the check can fail
    cache = FeatureCache(tmp_path)
    x, y = cache.block("train", 1)
    with torch.no_grad():
        bare = model.get_submodule(specs[1].name)(torch.from_numpy(x.astype("float32")))
    assert (bare - torch.from_numpy(y.astype("float32"))).abs().max() > 0.05


def test_per_sample_context_is_sliced_to_the_batch(tmp_path) -> None:
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    specs = find_blocks(model, (12, 16), "encoder.layers.*")
    cache = FeatureCache(tmp_path)
    images = torch.randn(5, 12, 16)
    cache.write(model, specs, images, "train", batch_size=2)
    context = cache.context("train", 0, specs[0]).batch([1, 3])
    expected = images[[1, 3], :, 0] > 1.2
    expected[:, 0] = False
    # the encoder hands its layers the mask as floats: -inf where masked
    assert torch.equal(context["src_key_padding_mask"] == float("-inf"), expected)
    assert context["src_mask"].shape == (12, 12) and context["is_causal"] is True


# timm families at small inputs, random weights: (name, create_model kwargs, input shape, layout)
FAMILIES = [
    ("resnet18", {}, (3, 64, 64), "nchw"),
    ("efficientnet_b0", {}, (3, 64, 64), "nchw"),
    ("convnext_atto", {}, (3, 64, 64), "nchw"),
    ("vit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64), "tokens"),
    ("deit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64), "tokens"),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, (3, 64, 64), "nhwc"),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "layout"), FAMILIES, ids=[f[0] for f in FAMILIES]
)
def test_timm_family_blocks_are_served_and_replay_exactly(name, kwargs, shape, layout, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    specs = find_blocks(model, shape)
    assert len(specs) >= 4
    assert {s.layout for s in specs} == {layout}
    for spec in specs:
        pool = build_pool(spec, model.get_submodule(spec.name))
        assert len(pool) > 1, f"{spec.name}: only the teacher"
    gaps = _replay_gap(model, specs, torch.randn(4, *shape), tmp_path)
    assert max(gaps.values()) < 5e-3, gaps


def test_conversion_replays_masked_layers_in_training_and_timing(tmp_path) -> None:
    """Through the whole pipeline: the teacher's own layer, replayed alone with its masks in
    the blockwise stage, reproduces its cached output (val NMSE at fp16 noise, where the same
    layer without its masks is far off), and the student runs inside the masked loop."""
    from archnet import convert
    from archnet.config import ConvertConfig

    torch.manual_seed(0)
    model = LoopedEncoder().eval()
    cfg = ConvertConfig(model="python", candidates="skip,linear", blocks="layers.*")
    cfg.blockwise.epochs, cfg.blockwise.batch_size = 1, 16
    cfg.finetune.epochs, cfg.finetune.batch_size = 1, 16
    cfg.latency.warmup, cfg.latency.repeats, cfg.latency.rounds = 2, 5, 2
    result = convert(model, torch.randn(120, 12, 16), budget=0.8, out=tmp_path / "r", config=cfg)
    specs = result.report["blocks"]
    assert len(specs) == 3
    distill = json.loads((result.run_dir / "distill.json").read_text())
    teacher_nmse = [choices["teacher"] for choices in distill["val_nmse"].values()]
    assert len(teacher_nmse) == 3 and max(teacher_nmse) < 1e-5, teacher_nmse
    x = torch.randn(4, 12, 16)
    with torch.no_grad():
        assert result.student(x).shape == (4, 3)
