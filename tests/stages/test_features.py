"""The features stage captures what blockwise training reads, and no more."""

from __future__ import annotations

import shutil

import numpy as np

from archnet import resume
from archnet.config import ConvertConfig
from archnet.store import open_store


def test_features_hold_only_the_images_blockwise_training_reads(finished_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, copy)
    full = open_store(copy).prepared.splits
    first_in = np.load(copy / "features/train/000_in.npy")
    assert first_in.shape[0] == full["train"] > 10
    cfg = ConvertConfig.from_dict(open_store(copy).config.to_dict())
    cfg.blockwise.max_samples = 10
    resume(copy, cfg)
    assert "stages from features on run again" in capsys.readouterr().err
    capped = np.load(copy / "features/train/000_in.npy")
    assert capped.shape[0] == 10
    np.testing.assert_array_equal(capped, first_in[:10])  # the same first images
    assert np.load(copy / "features/selection/logits.npy").shape[0] == full["selection"]
