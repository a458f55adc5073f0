"""Shared fixtures: a small trained teacher and one tiny finished conversion of it.

The teacher is tiny_resnet trained briefly on scikit-learn's digits, so its blocks compute
something (none is an identity: its residual branches start at zero and training moves them)
and a candidate that copies a block badly scores worse than one that copies it well.
"""

from __future__ import annotations

import pytest
import torch

from archnet import convert
from archnet.config import ConvertConfig
from archnet.data import ImageData, digits
from archnet.zoo import create_model, train_classifier


def tiny_config(**kw) -> ConvertConfig:
    """Smallest settings that still exercise every stage."""
    cfg = ConvertConfig(model="zoo:tiny_resnet", candidates="skip,dwsep_k3_relu,resnet_basic_w05")
    cfg.blockwise.epochs, cfg.blockwise.batch_size = 1, 16
    cfg.finetune.epochs, cfg.finetune.batch_size = 1, 16
    cfg.latency.warmup, cfg.latency.repeats, cfg.latency.rounds = 2, 5, 2
    # a tiny network's timings are noisy: no second search on a measured miss, so that a
    # run is the same however the machine timed it (tests that want it turn it on)
    cfg.budget_correction = False
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def digits_data() -> tuple[ImageData, ImageData]:
    """Digits at 32x32, split once: (teacher training images, images the teacher never saw)."""
    return digits(size=32).split(0.7, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(digits_data) -> torch.nn.Module:
    train, _ = digits_data
    torch.manual_seed(0)
    model = create_model("tiny_resnet", num_classes=10)
    return train_classifier(model, train, epochs=2, lr=1e-2, batch_size=64, progress=False)


@pytest.fixture(scope="session")
def tiny_vit_teacher(digits_data) -> torch.nn.Module:
    """timm's VisionTransformer, 2 blocks of width 32 on 8x8 patches, trained on digits."""
    train, _ = digits_data
    torch.manual_seed(0)
    model = create_model("tiny_vit", in_chans=3, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return train_classifier(
        model, train, epochs=15, lr=3e-3, batch_size=64, progress=False, max_shift=0
    )


@pytest.fixture(scope="session")
def tiny_images(digits_data) -> torch.Tensor:
    """Unlabeled images for conversions (unseen by the teacher)."""
    return digits_data[1].images[:48]


@pytest.fixture(scope="session")
def tiny_eval(digits_data) -> ImageData:
    """Labelled images for evaluation, disjoint from ``tiny_images``."""
    held = digits_data[1]
    return ImageData(held.images[48:112], held.labels[48:112], None, "digits-eval")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_teacher, tiny_images, tiny_eval):
    """A complete conversion of tiny_resnet; tests only read it or copy it."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return convert(
        tiny_teacher, tiny_images, budget=0.7, out=out, eval_data=tiny_eval, config=tiny_config()
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the session (its workers import what the tests do),
    its one node carrying the cpu-ort target (latency jobs are pinned to such nodes)."""
    ray = pytest.importorskip("ray")
    import os
    import sys

    path = os.pathsep.join(p for p in sys.path if p)
    ray.init(
        num_cpus=2,
        resources={"target:cpu-ort": 1},
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()
