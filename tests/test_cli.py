"""The command line: bad input ends with one clear line and exit code 2, never a traceback."""

import subprocess
import sys

import pytest
import torch

from archnet.cli import main
from archnet.zoo import create_model


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("archnet: error:")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture()
def resnet_ckpt(tmp_path):
    path = tmp_path / "tiny_resnet.pth"
    torch.save(create_model("tiny_resnet", num_classes=10).state_dict(), path)
    return path


def convert(capsys, tmp_path, *args: str, model: str = "zoo:tiny_resnet") -> tuple[int, str]:
    """`archnet convert` of ``model`` into tmp_path/r with extra ``args``; (exit code, stderr)."""
    code, _, err = run_cli(capsys, "convert", "--model", model, "--out", str(tmp_path / "r"), *args)
    return code, err


def test_missing_checkpoint(capsys, tmp_path):
    code, err = convert(
        capsys, tmp_path, "--checkpoint", str(tmp_path / "nope.pth"), "--data", "digits"
    )
    assert_one_line_error(code, err, "nope.pth", "does not exist")


def test_checkpoint_that_does_not_fit(capsys, tmp_path):
    path = tmp_path / "effnet.pth"
    torch.save(create_model("tiny_effnet", num_classes=10).state_dict(), path)
    code, err = convert(capsys, tmp_path, "--checkpoint", str(path), "--data", "digits")
    assert_one_line_error(code, err, "does not fit")


def test_model_without_blocks(capsys, tmp_path, monkeypatch):
    (tmp_path / "flatmodel.py").write_text(
        "import torch.nn as nn\n"
        "class Flat(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n"
        "        self.fc = nn.Linear(4, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.conv(x).mean((2, 3)))\n"
        "def make():\n"
        "    return Flat()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = convert(capsys, tmp_path, "--data", "digits", model="flatmodel:make")
    assert_one_line_error(code, err, "no recognisable blocks", "--blocks")


def test_empty_data_folder(capsys, tmp_path, resnet_ckpt):
    (tmp_path / "images").mkdir()
    code, err = convert(
        capsys,
        tmp_path,
        "--checkpoint",
        str(resnet_ckpt),
        "--data",
        str(tmp_path / "images"),
        "--input-size",
        "3,32,32",
    )
    assert_one_line_error(code, err, "images")


def test_unreadable_image(capsys, tmp_path, resnet_ckpt):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    code, err = convert(
        capsys,
        tmp_path,
        "--checkpoint",
        str(resnet_ckpt),
        "--data",
        str(folder),
        "--input-size",
        "3,32,32",
    )
    assert_one_line_error(code, err, "broken.png")


def test_unknown_target(capsys, tmp_path, resnet_ckpt):
    code, err = convert(
        capsys, tmp_path, "--checkpoint", str(resnet_ckpt), "--data", "digits", "--target", "tpu-v9"
    )
    assert_one_line_error(code, err, "tpu-v9")


def test_bad_budget(capsys, tmp_path, resnet_ckpt):
    code, err = convert(
        capsys, tmp_path, "--checkpoint", str(resnet_ckpt), "--data", "digits", "--budget", "fast"
    )
    assert_one_line_error(code, err, "fast")


def test_infeasible_search_budget(capsys, finished_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    code, _, err = run_cli(capsys, "search", "--run", str(copy), "--budget", "0.001")
    assert_one_line_error(code, err, "infeasible", "fastest student")


def test_search_then_report(capsys, finished_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    code, out, err = run_cli(capsys, "search", "--run", str(copy), "--budget", "1.0")
    assert code == 0, err
    assert "re-solved" in out
    code, out, _ = run_cli(capsys, "report", "--run", str(copy))
    assert code == 2  # the re-solved run has no report until it is exported again


def test_not_a_run_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "--run", str(tmp_path))
    assert_one_line_error(code, err, "not an archnet run")


def test_check_onnx(capsys, finished_run):
    code, out, _ = run_cli(
        capsys, "check", str(finished_run.run_dir / "student.onnx"), "--target", "cpu-ort"
    )
    assert code == 0
    assert "0 violation(s)" in out


def test_entry_point_exit_code_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "archnet.cli",
            "check",
            str(tmp_path / "missing.onnx"),
            "--target",
            "cpu-ort",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "missing.onnx" in proc.stderr


def test_latency_table(capsys):
    code, out, _ = run_cli(
        capsys,
        "latency",
        "--model",
        "zoo:tiny_resnet",
        "--input-size",
        "3,32,32",
        "--warmup",
        "1",
        "--repeats",
        "3",
    )
    assert code == 0
    for row in ("layer1.0", "layer3.1", "outside blocks", "predicted sum", "measured network"):
        assert row in out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--bits", "w9a4"), ("--bits", "2..8")),
        (("--bits", "4bit"), ("--bits", "w<bits>a<bits>")),
        (("--bits", "w4a4", "--first-last", "eight"), ("--first-last",)),
        (("--bits", "auto", "--size-budget", "tiny"), ("size budget", "1.5MB")),
        (("--target", "archnet-5op-int"), ("integer", "--bits")),
    ],
)
def test_bad_quantization_options(capsys, tmp_path, resnet_ckpt, args, needles):
    code, err = convert(
        capsys, tmp_path, "--checkpoint", str(resnet_ckpt), "--data", "digits", *args
    )
    assert_one_line_error(code, err, *needles)


def test_qdq_export_of_a_float_run(capsys, finished_run):
    code, _, err = run_cli(capsys, "export", "--run", str(finished_run.run_dir), "--format", "qdq")
    assert_one_line_error(code, err, "float student", "--bits")
