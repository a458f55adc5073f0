"""The command line: bad input ends with one clear line and exit code 2, never a traceback."""

import subprocess
import sys

import onnx
import pytest
import torch

from archnet import cli
from archnet.cli import main
from archnet.quant import export_qdq, qdq_report
from archnet.targets.qdq import COMPUTE_OPS, quantized_tensors
from archnet.zoo import create_model
from tests.targets.graphs import (
    GraphBuilder,
    activation_graph,
    compliant,
    computed_weight_conv,
    declare,
    lying_declaration,
    saturate_weights,
    tiny_quantized_classifier,
)


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


def _copy(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    return copy


def test_resume_with_a_changed_search_option_says_what_reruns(capsys, finished_run, tmp_path):
    copy = _copy(finished_run, tmp_path)
    code, out, err = run_cli(capsys, "convert", "--resume", "--out", str(copy), "--budget", "1.3")
    assert code == 0, err
    assert "budget (stored '0.7', now '1.3')" in err and "stages from search on run again" in err
    assert "budget 1.3" in out


def test_resume_with_a_config_file_applies_what_it_names(capsys, finished_run, tmp_path):
    from archnet.store import open_store

    copy = _copy(finished_run, tmp_path)
    before = open_store(copy).config
    (tmp_path / "more.toml").write_text('budget = "1.3"\n')
    code, out, err = run_cli(
        capsys, "convert", "--resume", "--out", str(copy), "--config", str(tmp_path / "more.toml")
    )
    assert code == 0, err
    assert "budget (stored '0.7', now '1.3')" in err and "stages from search on run again" in err
    after = open_store(copy).config
    assert after.budget == "1.3" and after.to_dict() == {**before.to_dict(), "budget": "1.3"}


def test_resume_with_a_changed_seed_is_refused(capsys, finished_run, tmp_path):
    copy = _copy(finished_run, tmp_path)
    code, _, err = run_cli(capsys, "convert", "--resume", "--out", str(copy), "--seed", "5")
    assert_one_line_error(code, err, "seed (stored 0, now 5)", "--out NEW_DIR")


def test_a_second_process_on_a_run_is_refused(capsys, finished_run, tmp_path):
    from archnet.store import open_store

    copy = _copy(finished_run, tmp_path)
    with open_store(copy).locked():
        code, _, err = run_cli(capsys, "export", "--run", str(copy))
    assert_one_line_error(code, err, "in use by another archnet process")


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('seed = "x"', "c.toml: seed must be an integer"),
        ('[blockwise]\nepochs = "two"', "blockwise.epochs must be an integer"),
        ("[finetune]\nlr = true", "finetune.lr must be a number"),
    ],
)
def test_config_values_of_the_wrong_type(capsys, tmp_path, resnet_ckpt, toml, needle):
    config = tmp_path / "c.toml"
    config.write_text(toml.replace("\\n", "\n") + "\n")
    code, err = convert(
        capsys,
        tmp_path,
        "--checkpoint",
        str(resnet_ckpt),
        "--data",
        "digits",
        "--config",
        str(config),
    )
    assert_one_line_error(code, err, needle)


def test_out_that_is_a_file(capsys, tmp_path, resnet_ckpt):
    (tmp_path / "r").write_text("not a directory")
    code, err = convert(capsys, tmp_path, "--checkpoint", str(resnet_ckpt), "--data", "digits")
    assert_one_line_error(code, err, "is a file")


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
        (("--executor", "slurm"), ("executor", "inprocess, process, ray")),
        (("--device", "cuda:7"), ("--device cuda:7", "--device cpu")),
        (("--device", "tpu"), ("--device", "cpu, cuda")),
    ],
)
def test_bad_quantization_options(capsys, tmp_path, resnet_ckpt, args, needles):
    code, err = convert(
        capsys, tmp_path, "--checkpoint", str(resnet_ckpt), "--data", "digits", *args
    )
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("fmt", ["qdq", "qonnx"])
def test_quantized_export_of_a_float_run(capsys, finished_run, fmt):
    code, _, err = run_cli(capsys, "export", "--run", str(finished_run.run_dir), "--format", fmt)
    assert_one_line_error(code, err, "float student", "--bits")


# --- archnet check --------------------------------------------------------------------------------


def save(tmp_path, name: str, model: onnx.ModelProto) -> str:
    path = tmp_path / name
    onnx.save_model(model, str(path))
    return str(path)


def test_check_exit_codes(tmp_path, capsys):
    good = save(tmp_path, "good.onnx", compliant().model())
    g = GraphBuilder()
    g.conv("/blocks.0/conv_pw/Conv", 8, 8, k=7)
    g.add("Sigmoid", "/blocks.0/act/Sigmoid")
    bad = save(tmp_path, "bad.onnx", g.model())

    code, out, _ = run_cli(capsys, "check", good, "--target", "archnet-5op")
    assert code == 0
    assert out.strip().splitlines() == ["0 violation(s), 0 unverified of archnet-5op in 8 nodes"]

    code, out, _ = run_cli(capsys, "check", bad, "--target", "archnet-5op", "--allow-unverified")
    assert code == 1  # violations fail whatever is allowed
    lines = out.strip().splitlines()
    assert lines[0].startswith("/blocks.0/conv_pw/Conv (Conv) [from blocks.0.conv_pw]: ")
    assert "kernel_shape=[7, 7]" in lines[0]
    assert lines[1].startswith("/blocks.0/act/Sigmoid (Sigmoid) [from blocks.0.act]: ")
    assert lines[2] == "2 violation(s), 0 unverified of archnet-5op in 2 nodes"


def test_check_unverified_fails_unless_allowed(tmp_path, capsys):
    """The conv's weight shape cannot be inferred, so its kernel rule cannot be checked."""
    path = save(tmp_path, "dyn.onnx", computed_weight_conv().raw())
    code, out, _ = run_cli(capsys, "check", path, "--target", "archnet-5op")
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("/c/Conv (Conv) [from c]: unverified: kernel_shape unknown: ")
    assert lines[1] == "0 violation(s), 1 unverified of archnet-5op in 2 nodes"
    code, out, _ = run_cli(capsys, "check", path, "--target", "archnet-5op", "--allow-unverified")
    assert code == 0
    assert out.strip().splitlines()[-1] == (
        "0 violation(s), 1 unverified (unverified allowed) of archnet-5op in 2 nodes"
    )
    # an open target has no rule that needs the kernel
    assert run_cli(capsys, "check", path, "--target", "cpu-ort")[0] == 0


def test_check_computed_clip_bound_is_unverified(tmp_path, capsys):
    model = declare(activation_graph("computed").model(), [{"tensor": "x", "bits": 4}])
    path = save(tmp_path, "clip.onnx", model)
    code, out, _ = run_cli(capsys, "check", path, "--target", "cpu-ort")
    assert code == 1
    assert out.startswith("/a/Q (QuantizeLinear) [from r]: unverified: activation 'x' is declared")
    assert run_cli(capsys, "check", path, "--target", "cpu-ort", "--allow-unverified")[0] == 0


def test_check_user_profile_and_missing_file(tmp_path, capsys):
    model = save(tmp_path, "m.onnx", compliant().model())
    profile = tmp_path / "chip.toml"
    profile.write_text(
        'name = "chip"\n[latency]\nbackend = "onnxruntime"\n[rules]\nmax_channels = 16\n',
        encoding="utf-8",
    )
    code, out, _ = run_cli(capsys, "check", model, "--target", str(profile))
    assert code == 1
    assert out.strip().splitlines() == [
        "/fc/Gemm (Gemm) [from fc]: in_features=32 is not allowed (chip rules.max_channels = 16)",
        "1 violation(s), 0 unverified of chip in 8 nodes",
    ]
    code, _, err = run_cli(capsys, "check", str(tmp_path / "absent.onnx"), "--target", "cpu-ort")
    assert_one_line_error(code, err, "absent.onnx", "does not exist")
    (tmp_path / "notes.onnx").write_text("not a model", encoding="utf-8")
    code, _, err = run_cli(capsys, "check", str(tmp_path / "notes.onnx"), "--target", "cpu-ort")
    assert_one_line_error(code, err, "notes.onnx", "not a readable ONNX model")


def qdq_rows(out: str) -> list[list[str]]:
    return [
        [c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines() if ln.startswith("│")
    ]


def test_check_prints_declared_and_graph_bits(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.out, "width", 200)  # at 80 columns the table shortens names
    model = tiny_quantized_classifier()
    saturate_weights(model)
    path = tmp_path / "q.onnx"
    proto = export_qdq(model, (1, 3, 16, 16), path=path)
    tensors = quantized_tensors(proto)
    code, out, _ = run_cli(capsys, "check", str(path), "--target", "archnet-5op-int")
    assert code == 0
    lines = out.strip().splitlines()
    assert (
        lines[0]
        == f"0 violation(s), 0 unverified of archnet-5op-int in {len(proto.graph.node)} nodes"
    )
    header = next(line for line in lines if "name" in line and "consumer" in line)
    for col in ("kind", "declared", "graph bits", "storage", "signed", "per-channel", "verified"):
        assert col in header
    assert [row[:5] + row[-1:] for row in qdq_rows(out)] == [
        [t.name, t.kind, str(r["bits"]), str(r["bits"]), t.storage, "yes"]
        for t, r in zip(tensors, qdq_report(proto), strict=True)
    ]
    counts = {b: sum(t.bits == b for t in tensors) for b in (8, 4)}
    assert lines[-1] == (
        f"{len(tensors)} quantized tensors: {counts[8]} at 8 bits, {counts[4]} at 4 bits by the "
        f"graph; declared: {len(tensors)} verified; float compute nodes: 0"
    )


def test_check_rewritten_declaration_fails(tmp_path, capsys, monkeypatch):
    """Metadata rewritten to declare 2 bits on a 4-bit weight: the graph says 4, check fails."""
    monkeypatch.setattr(cli.out, "width", 200)
    lie, entry = lying_declaration()
    path = save(tmp_path, "lie.onnx", lie)
    code, out, _ = run_cli(capsys, "check", path, "--target", "archnet-5op-int")
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"<unnamed> (DequantizeLinear) [from 2]: weight '{entry['tensor']}'")
    assert lines[1].startswith("1 violation(s), 0 unverified")
    row = next(r for r in qdq_rows(out) if r[0] == entry["tensor"])
    assert (row[2], row[3], row[-1]) == ("2", "4", "NO")
    assert "declared: 5 verified, 1 mismatch;" in lines[-1]


def test_check_float_model_on_integer_target(tmp_path, capsys):
    model = compliant().model()
    path = save(tmp_path, "f.onnx", model)
    code, out, _ = run_cli(capsys, "check", path, "--target", "archnet-5op-int")
    assert code == 1
    lines = out.strip().splitlines()
    compute = sum(n.op_type in COMPUTE_OPS for n in model.graph.node)
    assert len(lines) == 2 * compute + 1  # two float operands per node, then the count
    assert all("float compute: input" in line for line in lines[:-1])
    assert "quantized tensors" not in lines[-1]


def test_targets_lists_archnet_5op(capsys, monkeypatch):
    monkeypatch.setattr(cli.out, "width", 200)  # at 80 columns the table shortens names
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0
    names = {line.split("│")[1].strip() for line in out.splitlines() if "│" in line}
    assert {"archnet-5op", "archnet-5op-int"} <= names


def test_input_size_takes_any_shape_of_positive_sizes():
    from archnet.cli import _input_size
    from archnet.errors import ArchnetError

    assert _input_size("3,224,192") == (3, 224, 192)
    assert _input_size("1,16000") == (1, 16000)
    for bad in ("3,0,8", "a,b", ""):
        with pytest.raises(ArchnetError, match="is not a list of positive sizes"):
            _input_size(bad)
