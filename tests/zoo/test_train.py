"""Teacher training is fast, deterministic and actually learns."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from archnet.data import ImageData, digits
from archnet.errors import ArchnetError
from archnet.zoo import create_model, evaluate, train_classifier


@pytest.fixture(scope="module")
def small():
    return digits(size=32).subset(128)


def _loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.images), data.labels))


def test_training_lowers_loss_and_beats_chance(small):
    torch.manual_seed(0)
    model = create_model("tiny_effnet")
    before = _loss(model, small)
    t0 = time.perf_counter()
    model = train_classifier(model, small, epochs=2, lr=5e-3, batch_size=32, progress=False)
    assert time.perf_counter() - t0 < 60  # ~3 s on 2 idle cores; loose for shared machines
    assert not model.training
    assert _loss(model, small) < before
    assert evaluate(model, small) > 20.0  # chance is 10%


def test_training_is_deterministic(small):
    data = small.subset(64)
    torch.manual_seed(1)
    a0 = create_model("tiny_resnet", drop_rate=0.2)
    b0 = create_model("tiny_resnet", drop_rate=0.2)
    b0.load_state_dict(a0.state_dict())
    a = train_classifier(a0, data, epochs=1, lr=1e-3, seed=3, progress=False)
    b = train_classifier(b0, data, epochs=1, lr=1e-3, seed=3, progress=False)
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_unlabeled_data_is_rejected(small):
    with pytest.raises(ArchnetError, match="labels"):
        train_classifier(create_model("tiny_resnet"), ImageData(small.images), 1, 1e-3)
    with pytest.raises(ArchnetError, match="labels"):
        evaluate(create_model("tiny_resnet"), ImageData(small.images, source="x"))
