"""The full demo (minutes): marked slow, run with `make test-slow`."""

import pytest

from archnet.demo import run_demo


@pytest.mark.slow
def test_demo_student_keeps_accuracy_and_is_faster(tmp_path):
    rep, run_dir = run_demo(tmp_path / "demo")
    assert (run_dir / "student.onnx").is_file()
    assert rep["teacher"]["top1"] - rep["student"]["top1"] <= 1.0
    assert rep["student"]["predicted_latency_ms"] <= rep["budgets"]["latency_ms"] + 1e-9
    assert rep["speedup"] > 1.0  # the 2x target is reported by the demo table, not timed here
