"""Shared fixtures: one tiny finished conversion reused by the pipeline and CLI tests."""

from __future__ import annotations

import pytest
import torch

from archnet.config import ConvertConfig
from archnet.pipeline import convert
from archnet.zoo import create_model


def tiny_config(**kw) -> ConvertConfig:
    """Smallest settings that still exercise every stage."""
    cfg = ConvertConfig(model="zoo:tiny_resnet", candidates="skip,dwsep_k3_relu,resnet_basic_w05")
    cfg.blockwise.epochs, cfg.blockwise.batch_size = 1, 16
    cfg.finetune.epochs, cfg.finetune.batch_size = 1, 16
    cfg.latency.warmup, cfg.latency.repeats, cfg.latency.rounds = 2, 5, 2
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def tiny_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_resnet", num_classes=10).eval()


@pytest.fixture(scope="session")
def tiny_images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(48, 3, 32, 32)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_teacher, tiny_images):
    """A complete conversion of tiny_resnet; tests only read it or copy it."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    labels = torch.randint(0, 10, (len(tiny_images),))
    from archnet.data import ImageData

    eval_data = ImageData(tiny_images[:16], labels[:16], None, "test")
    return convert(
        tiny_teacher, tiny_images, budget=0.7, out=out, eval_data=eval_data, config=tiny_config()
    )
