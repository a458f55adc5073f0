"""Data loading: named datasets (digits, Fashion-MNIST), IDX files, folders, tensors, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archnet.cli import main
from archnet.data import (
    FASHION_MNIST_CLASSES,
    ImageData,
    batches,
    check_finite,
    digits,
    fashion_mnist_missing,
    load_data,
    load_images,
    native_input_size,
    read_idx,
    test_split,
)
from archnet.errors import ArchnetError

FASHION_MNIST_ABSENT = fashion_mnist_missing()
# Fashion-MNIST's normalized zero: what the 2-pixel padding to 32x32 holds.
ZERO = (0.0 - 0.2860) / 0.3530


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


# --- IDX files and Fashion-MNIST from a folder -----------------------------------------------
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def _write_idx(path: Path, array: np.ndarray, gz: bool | None = None) -> Path:
    """An IDX file as the format describes it: written here, independent of the reader."""
    array = np.asarray(array)
    big = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, _CODES[big.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + big.tobytes()
    gz = path.suffix == ".gz" if gz is None else gz
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _fashion_dir(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> Path:
    """A Fashion-MNIST folder in miniature: image i is filled with value 10 * (i % 10)."""
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.repeat(labels * 10, 28 * 28).reshape(n, 28, 28).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_dtypes_and_shapes(tmp_path, gz):
    u8 = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    i32 = np.array([1, -2, 70000], dtype=np.int32)  # multi-byte: byte order matters
    f32 = np.array([[0.5, -1.25]], dtype=np.float32)
    for name, arr in (("u8", u8), ("i32", i32), ("f32", f32)):
        back = read_idx(_write_idx(tmp_path / name, arr, gz=gz))
        assert back.shape == arr.shape and np.array_equal(back, arr)
        assert back.dtype.isnative and back.flags.writeable


def test_truncated_or_corrupt_idx_names_the_file(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    plain = _write_idx(tmp_path / "cut-images-idx3-ubyte", images, gz=False)
    plain.write_bytes(plain.read_bytes()[:-5])
    packed = _write_idx(tmp_path / "cut-images-idx3-ubyte.gz", images)
    packed.write_bytes(packed.read_bytes()[:-12])  # a gzip stream without its end
    longer = _write_idx(tmp_path / "long-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
    longer.write_bytes(longer.read_bytes() + b"\0")
    notidx = tmp_path / "notes-idx1-ubyte"
    notidx.write_bytes(b"hello world")
    for path, why in (
        (plain, "truncated"),
        (packed, "truncated or corrupt"),
        (longer, "corrupt"),
        (notidx, "not an IDX file"),
    ):
        with pytest.raises(ArchnetError, match=why) as err:
            read_idx(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_a_folder(tmp_path, gz):
    root = _fashion_dir(tmp_path / "fm", gz=gz)
    d = load_data(f"fashion-mnist:{root}", size=32, channels=1)
    assert d.images.shape == (20, 1, 32, 32) and d.images.dtype == torch.float32
    assert d.labels.dtype == torch.int64 and d.labels.tolist() == [i % 10 for i in range(20)]
    assert d.classes == FASHION_MNIST_CLASSES and len(d.classes) == 10
    # 28x28 centred in 32x32: the border is the normalized background, the centre the pixels
    img = d.images[3, 0]
    assert torch.allclose(img[:2], torch.tensor(ZERO)) and torch.allclose(
        img[:, -2:], torch.tensor(ZERO)
    )
    assert torch.allclose(img[2:30, 2:30], torch.tensor((30 / 255 - 0.2860) / 0.3530))
    test = test_split(f"fashion-mnist:{root}", size=32, channels=1)
    assert test is not None and len(test) == 10 and "test" in test.source


def test_fashion_mnist_other_sizes_resize_and_channels_repeat(tmp_path):
    root = _fashion_dir(tmp_path / "fm")
    rgb = load_data(f"fashion-mnist:{root}", size=16, channels=3)
    assert rgb.images.shape == (20, 3, 16, 16)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    # resized, not padded: a constant image stays constant, with no background border
    assert torch.allclose(rgb.images[5, 0], torch.tensor((50 / 255 - 0.2860) / 0.3530), atol=1e-5)
    native = load_data(f"fashion-mnist:{root}", size=28, channels=1)
    assert native.images.shape == (20, 1, 28, 28)


def test_fashion_mnist_folder_missing_a_file(tmp_path, capsys):
    root = _fashion_dir(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ArchnetError) as err:
        load_data(f"fashion-mnist:{root}", size=32, channels=1)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images" not in msg
    assert "github.com/zalandoresearch/fashion-mnist" in msg and "dataset-fashion-mnist" in msg
    code, err_text = _cli(capsys, tmp_path, f"fashion-mnist:{root}", "1,32,32")
    _assert_one_line(code, err_text, "t10k-labels-idx1-ubyte", "--data fashion-mnist")
    with pytest.raises(ArchnetError, match="does not exist"):
        load_data(f"fashion-mnist:{tmp_path / 'nowhere'}", size=32)


def test_fashion_mnist_with_labels_that_do_not_match(tmp_path):
    root = _fashion_dir(tmp_path / "fm")
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(ArchnetError, match="train-labels-idx1-ubyte.gz"):
        load_data(f"fashion-mnist:{root}", size=32)


def test_specs_names_splits_and_native_sizes(tmp_path):
    assert native_input_size("fashion-mnist") == (1, 32, 32)
    assert native_input_size(f"FASHION-MNIST:{tmp_path}") == (1, 32, 32)
    assert native_input_size("digits") == (3, 32, 32)
    assert native_input_size(str(tmp_path)) is None
    assert test_split("digits", size=8) is None and test_split(str(tmp_path), size=8) is None
    assert len(load_data("digits", size=8, split="train")) == 1797
    with pytest.raises(ArchnetError, match="digits has no test split"):
        load_data("digits", size=8, split="test")
    with pytest.raises(ArchnetError, match="no test split"):
        load_data(str(tmp_path), size=8, split="test")
    with pytest.raises(ArchnetError, match="split 'val'"):
        load_data("digits", size=8, split="val")
    with pytest.raises(ArchnetError, match="no folder after ':'"):
        load_data("fashion-mnist:", size=32)
    with pytest.raises(ArchnetError, match="takes no folder"):
        load_data(f"digits:{tmp_path}", size=8)
    with pytest.raises(ArchnetError, match="did you mean 'fashion-mnist'"):
        load_data("fashion-mnst", size=32)


# --- NaN and infinity ------------------------------------------------------------------------
def test_check_finite_counts_and_names_the_first():
    x = torch.zeros(30, 1, 4, 4)
    check_finite(x, "clean")  # no error
    x[17, 0, 1, 2] = float("nan")
    x[20, 0, 0, 0] = float("inf")
    x[25, 0, 3, 3] = -float("inf")
    with pytest.raises(ArchnetError) as err:
        check_finite(x, "X")
    assert str(err.value) == (
        "data X: 3 images hold NaN or infinity (first: index 17); clean or drop them"
    )
    check_finite(torch.full((2, 3), 3e38), "large")  # sums overflow; values are finite


def test_load_data_refuses_nan_from_a_tensor_file(tmp_path, capsys):
    x = torch.randn(12, 3, 32, 32)
    x[4, 1, 2, 3] = float("nan")
    torch.save(x, tmp_path / "nan.pt")
    with pytest.raises(ArchnetError, match=r"1 image holds NaN or infinity \(first: index 4\)"):
        load_data(str(tmp_path / "nan.pt"), size=32)
    code, err = _cli(capsys, tmp_path, str(tmp_path / "nan.pt"), "3,32,32")
    _assert_one_line(code, err, "nan.pt", "NaN or infinity", "index 4")


def _cli(capsys, tmp_path: Path, data: str, input_size: str) -> tuple[int, str]:
    code = main(
        [
            "convert",
            "--model",
            "zoo:tiny_resnet",
            "--data",
            data,
            "--input-size",
            input_size,
            "--out",
            str(tmp_path / "run"),
        ]
    )
    return code, capsys.readouterr().err


def _assert_one_line(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("archnet: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- the real set, as the Debian/Ubuntu package installs it ------------------------------------
@pytest.fixture(scope="module")
def fashion() -> tuple[ImageData, ImageData]:
    return load_data("fashion-mnist", size=32, channels=1), test_split("fashion-mnist", 32, 1)


@pytest.mark.skipif(FASHION_MNIST_ABSENT is not None, reason=str(FASHION_MNIST_ABSENT))
def test_real_fashion_mnist(fashion):
    train, test = fashion
    for data, n in ((train, 60_000), (test, 10_000)):
        assert data.images.shape == (n, 1, 32, 32) and data.images.dtype == torch.float32
        assert torch.isfinite(data.images).all()
        assert data.labels.dtype == torch.int64
        assert data.labels.bincount(minlength=10).tolist() == [n // 10] * 10
        assert data.classes == FASHION_MNIST_CLASSES
    # normalized with the training set's own statistics: mean 0, std 1 inside the padding
    centre = train.images[:, :, 2:30, 2:30]
    assert abs(float(centre.mean())) < 0.01 and abs(float(centre.std()) - 1.0) < 0.01
    assert torch.allclose(train.images[:, :, :2], torch.tensor(ZERO))
    assert not torch.equal(train.images[:100], test.images[:100])


def test_non_square_sizes_for_folders_and_fashion_mnist(tmp_path):
    for i in range(2):
        _png(tmp_path / "imgs" / f"{i}.png", 40 * i, size=(30, 20))
    d = load_images(tmp_path / "imgs", size=(8, 12))
    assert d.images.shape == (2, 3, 8, 12)
    root = _fashion_dir(tmp_path / "fm")
    assert load_data(f"fashion-mnist:{root}", size=(32, 40), channels=1).images.shape == (
        20,
        1,
        32,
        40,
    )


def test_tensor_inputs_of_any_shape(tmp_path):
    """1-D frames: the tensor file's own shape, named by the input size; images need C,H,W."""
    x = torch.randn(6, 1, 100)
    torch.save(x, tmp_path / "frames.pt")
    d = load_data(str(tmp_path / "frames.pt"), size=0, channels=0, shape=(1, 100))
    assert torch.equal(d.images, x)
    with pytest.raises(ArchnetError, match=r"expected \(N, 1, 50\)"):
        load_data(str(tmp_path / "frames.pt"), size=0, channels=0, shape=(1, 50))
    _png(tmp_path / "imgs" / "a.png", 10)
    with pytest.raises(ArchnetError, match="is not C,H,W"):
        load_data(str(tmp_path / "imgs"), size=0, channels=0, shape=(1, 100))
