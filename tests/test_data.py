"""Data loading: the built-in digits, image folders, tensor files, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from archnet.data import ImageData, batches, digits, load_data, load_images
from archnet.errors import ArchnetError


def _png(path, value: int, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_digits_shape_range_labels():
    d = digits(size=32)
    assert d.images.shape == (1797, 3, 32, 32)
    assert d.images.dtype == torch.float32
    assert d.images.min() >= -1.0 and d.images.max() <= 1.0
    assert d.images.min() < -0.9 and d.images.max() > 0.9
    assert d.labels is not None and d.labels.dtype == torch.int64
    assert sorted(d.labels.unique().tolist()) == list(range(10))
    assert d.classes == [str(i) for i in range(10)]
    assert torch.equal(d.images[:, 0], d.images[:, 2])
    assert load_data("digits", size=16, channels=1).images.shape == (1797, 1, 16, 16)


def test_split_and_subset_are_deterministic():
    d = digits(size=8)
    a, b = d.split(0.8, seed=3)
    a2, _ = d.split(0.8, seed=3)
    assert len(a) + len(b) == len(d) and len(a) == round(0.8 * len(d))
    assert torch.equal(a.images, a2.images) and torch.equal(a.labels, a2.labels)
    assert not torch.equal(a.labels, d.split(0.8, seed=4)[0].labels)
    s = d.subset(5)
    assert len(s) == 5 and torch.equal(s.labels, d.labels[:5])
    with pytest.raises(ArchnetError):
        d.split(1.5, seed=0)


def test_batches_cover_everything_once():
    d = digits(size=8).subset(50)
    seen = torch.cat([y for _, y in batches(d, 16, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == sorted(d.labels.tolist())
    plain = list(batches(d.images, 16))
    assert [len(b) for b in plain] == [16, 16, 16, 2]


def test_folder_with_class_subfolders_is_labeled(tmp_path):
    for i in range(2):
        _png(tmp_path / "cat" / f"{i}.png", 10)
        _png(tmp_path / "dog" / "deep" / f"{i}.jpg", 200)
    d = load_images(tmp_path, size=8)
    assert isinstance(d, ImageData)
    assert d.images.shape == (4, 3, 8, 8)
    assert d.classes == ["cat", "dog"]
    assert d.labels.tolist() == [0, 0, 1, 1]
    assert d.images[0].mean() < d.images[3].mean()  # dark cats, bright dogs


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        _png(tmp_path / f"img{i}.png", 50 * i, size=(20, 40))
    d = load_data(str(tmp_path), size=16)
    assert d.images.shape == (3, 3, 16, 16)
    assert d.labels is None and d.classes is None


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ArchnetError, match="nope"):
        load_data(str(missing), size=8)


def test_empty_folder_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ArchnetError, match="empty"):
        load_images(tmp_path / "empty", size=8)


def test_corrupt_image_names_the_file(tmp_path):
    _png(tmp_path / "good.png", 10)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ArchnetError, match="broken.png") as err:
        load_images(tmp_path, size=8)
    assert "\n" not in str(err.value)


def test_pt_tensor_and_dict_load(tmp_path):
    x = torch.randn(5, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    d = load_images(tmp_path / "x.pt", size=8)
    assert torch.equal(d.images, x) and d.labels is None
    y = torch.arange(5)
    torch.save({"images": x, "labels": y}, tmp_path / "xy.pt")
    d = load_data(str(tmp_path / "xy.pt"), size=8)
    assert torch.equal(d.labels, y)


def test_npy_loads(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    d = load_images(tmp_path / "x.npy", size=8)
    assert d.images.shape == (4, 3, 8, 8) and d.images.dtype == torch.float32


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 3, 16, 16), (2, 1, 8, 8)])
def test_tensor_with_wrong_shape_is_rejected(tmp_path, shape):
    torch.save(torch.zeros(shape), tmp_path / "bad.pt")
    with pytest.raises(ArchnetError, match="bad.pt"):
        load_images(tmp_path / "bad.pt", size=8)


def test_mismatched_labels_are_rejected(tmp_path):
    torch.save({"images": torch.zeros(3, 3, 8, 8), "labels": torch.zeros(2)}, tmp_path / "m.pt")
    with pytest.raises(ArchnetError, match="labels"):
        load_images(tmp_path / "m.pt", size=8)
