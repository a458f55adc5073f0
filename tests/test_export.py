"""The export stage as a pure function: ONNX files, checks and one timing run, no run store."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from archnet import ArchnetError, find_blocks, load_target
from archnet.config import LatencyConfig
from archnet.export import export_and_measure

FAST = LatencyConfig(warmup=1, repeats=3, rounds=1)


@pytest.fixture(scope="module")
def pair(tiny_teacher):
    specs = find_blocks(tiny_teacher, (3, 32, 32))
    student = copy.deepcopy(tiny_teacher)
    student.set_submodule("layer1.1", nn.Identity())
    return tiny_teacher, student.eval(), specs


def test_files_checks_and_same_run_timings(tmp_path, pair, tiny_eval):
    teacher, student, specs = pair
    out = export_and_measure(
        teacher,
        student,
        specs,
        load_target("cpu-ort"),
        FAST,
        (1, 3, 32, 32),
        tmp_path,
        tiny_eval.images,
        tiny_eval.labels,
    )
    assert {p.name for p in tmp_path.iterdir()} == {"teacher.onnx", "student.onnx"}
    assert out.check == {"violations": 0, "unverified": 0}
    assert set(out.ms) == {"teacher", "student"} and all(v > 0 for v in out.ms.values())
    assert out.sizes["student"]["file_bytes"] == (tmp_path / "student.onnx").stat().st_size
    assert out.sizes["student"]["file_bytes"] < out.sizes["teacher"]["file_bytes"]  # a block fewer
    assert out.exporters["student.onnx"].startswith(("torchscript", "dynamo"))
    assert out.quantization is None


def test_a_student_the_target_cannot_run_fails_the_export(tmp_path, pair, tiny_eval):
    teacher, student, specs = pair  # 7x7 stem and residual Adds: not Arch-Net's operators
    with pytest.raises(ArchnetError, match="fails the check against target archnet-5op"):
        export_and_measure(
            teacher,
            student,
            specs,
            load_target("archnet-5op"),
            FAST,
            (1, 3, 32, 32),
            tmp_path,
            tiny_eval.images,
        )
