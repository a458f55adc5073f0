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


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "max_drop"), [("w4a4", 1.0), ("w2a4", 3.0)])
def test_quantized_demo_keeps_accuracy(tmp_path, bits: str, max_drop: float):
    rep, run_dir = run_demo(tmp_path / "demo", bits=bits)
    q = rep["quantization"]
    assert rep["teacher"]["top1"] - rep["student"]["top1"] <= max_drop
    assert q["max_abs_diff"] <= q["output_step"]  # the QDQ graph is the PyTorch model
    # mostly 4- or 2-bit weights: well under a quarter of the same network in FP32
    assert q["size_bits"] < q["fp32_size_bits"] / 4
    assert q["size_bits"] == rep["student"]["size_bits"]  # the search's size is exact
    assert (run_dir / "student_fp32.onnx").is_file()
