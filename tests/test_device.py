"""--device: 'auto' resolves to what the machine has, a device it lacks is a one-line error;
tensors nested in containers move; mixed-precision training still learns."""

from __future__ import annotations

import pytest
import torch

from archnet.device import autocast, resolve_device, to_device
from archnet.distill.blockwise import BlockwiseConfig, evaluate_nmse, train_block
from archnet.errors import ArchnetError
from tests.distill.test_blockwise import _fresh_candidate, _regression_data


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ArchnetError, match="use cpu, cuda"):
        resolve_device("tpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ArchnetError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


def test_to_device_moves_nested_tensors():
    obj = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), 3)], "c": "x"}
    moved = to_device(obj, "cpu")
    assert moved["c"] == "x" and moved["b"][1][1] == 3
    assert isinstance(moved["b"][1], tuple) and torch.equal(moved["a"], obj["a"])


def test_mixed_precision_training_learns():
    x, y = _regression_data(128, seed=0)
    xv, yv = _regression_data(32, seed=1)
    module = _fresh_candidate()
    before = evaluate_nmse(module, xv, yv)
    cfg = BlockwiseConfig(epochs=4, batch_size=16, lr=3e-2, amp=True)
    history = train_block(module, x, y, cfg, seed=0)
    assert history[-1] < 0.6 * history[0] and evaluate_nmse(module, xv, yv) < 0.7 * before
    with autocast("cpu", True):  # bfloat16 matmuls on the CPU
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast("cpu", False):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
