"""Creating a run: input size, the three splits, and bad input refused before any work."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from torch import nn

from archnet import ArchnetError, ConvertConfig, convert
from archnet.data import ImageData
from archnet.stages.prepare import resolve_input_size, splits
from archnet.store import prepare_directory


class _WithCfg(nn.Module):
    pretrained_cfg = {"input_size": (3, 48, 48)}


def test_input_size_from_the_model_before_the_data_set():
    cfg = ConvertConfig()
    resolve_input_size(cfg, _WithCfg(), "fashion-mnist")
    assert cfg.input_size == (3, 48, 48)


def test_input_size_from_the_data_set_or_the_tensor():
    cfg = ConvertConfig()
    resolve_input_size(cfg, nn.Identity(), "fashion-mnist")
    assert cfg.input_size == (1, 32, 32)
    cfg = ConvertConfig()
    resolve_input_size(cfg, _WithCfg(), torch.zeros(4, 2, 8, 8))
    assert cfg.input_size == (2, 8, 8)


def test_the_data_sets_size_with_the_models_channels():
    """A 3-channel model on Fashion-MNIST gets its grayscale images repeated over 3 channels."""
    cfg = ConvertConfig()
    resolve_input_size(cfg, nn.Sequential(nn.Conv2d(3, 4, 3)), "fashion-mnist")
    assert cfg.input_size == (3, 32, 32)


def test_a_model_that_fails_on_the_input_is_one_line(tmp_path, tiny_teacher):
    with pytest.raises(
        ArchnetError, match=r"fails on an input of shape \(2, 5, 32, 32\).*--input-size"
    ):
        convert(tiny_teacher, torch.randn(20, 5, 32, 32), out=tmp_path / "r")


def test_unknown_input_size_is_asked_for(tmp_path):
    with pytest.raises(ArchnetError, match="--input-size"):
        resolve_input_size(ConvertConfig(), nn.Identity(), str(tmp_path))


def test_splits_are_disjoint_capped_and_carved():
    images = torch.arange(200, dtype=torch.float32).reshape(200, 1, 1, 1)
    cfg = ConvertConfig(input_size=(1, 1, 1), max_selection=10, max_samples=50)
    parts = splits(images, None, cfg)
    sizes = parts.sizes
    assert sizes == {"train": 50, "selection": 10, "eval": 30}
    ids = {k: set(parts.blob[f"{k}_images"].flatten().tolist()) for k in sizes}
    assert not ids["train"] & ids["selection"] and not ids["eval"] & (
        ids["train"] | ids["selection"]
    )
    assert "carved out" in parts.eval_source


def test_given_evaluation_data_is_not_carved():
    images = torch.randn(40, 1, 2, 2)
    ev = ImageData(torch.randn(7, 1, 2, 2), torch.zeros(7, dtype=torch.long), None, "mine")
    parts = splits(images, ev, ConvertConfig(input_size=(1, 2, 2)))
    assert parts.sizes["eval"] == 7 and parts.sizes["train"] + parts.sizes["selection"] == 40
    assert torch.equal(parts.blob["eval_labels"], ev.labels)


def test_data_with_nan_is_refused_before_any_work(tmp_path, tiny_teacher):
    images = torch.randn(20, 3, 32, 32)
    images[3, 0, 0, 0] = float("nan")
    with pytest.raises(ArchnetError, match="NaN or infinity"):
        convert(tiny_teacher, images, out=tmp_path / "r")
    assert not (tmp_path / "r" / "teacher.pt").exists()


def test_out_that_is_a_file(tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(ArchnetError, match="is a file"):
        prepare_directory(out)


def test_out_on_a_read_only_file_system(tmp_path, monkeypatch):
    def refuse(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(ArchnetError, match="read-only file system"):
        prepare_directory(tmp_path / "r")


@pytest.mark.parametrize(("key", "value"), [("seed", "x"), ("max_samples", 1.5), ("bits", 4)])
def test_options_of_the_wrong_type(tmp_path, tiny_teacher, tiny_images, key, value):
    with pytest.raises(ArchnetError, match=f"option {key} must be"):
        convert(tiny_teacher, tiny_images, out=tmp_path / "r", **{key: value})
    assert not (tmp_path / "r").exists()
