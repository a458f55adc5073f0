"""Quantized conversions: fixed bits, first/last layers, mixed precision under a size budget."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from archnet import convert
from archnet.choices import parse_choice
from archnet.data import ImageData
from archnet.export import output_step
from archnet.onnx_utils import ort_session
from archnet.quant import QuantModule, model_size_bits
from tests.conftest import tiny_config


def _convert(teacher, images, out, **kw):
    eval_data = ImageData(images[:16], None, None, "test")
    cfg = tiny_config(**{"candidates": "skip,dwsep_k3_relu", "budget": "2.0", **kw})
    cfg.blockwise.quant_epochs = 1
    cfg.arch.epochs_per_stage, cfg.arch.global_epochs = 0.25, 1
    return convert(
        teacher, images, cfg.target, budget=cfg.budget, out=out, eval_data=eval_data, config=cfg
    )


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory, tiny_teacher, tiny_images):
    return _convert(
        tiny_teacher, tiny_images, tmp_path_factory.mktemp("runs") / "w4a4", bits="w4a4"
    )


def test_every_layer_quantized_with_8_bit_edges(w4a4_run) -> None:
    layers = [
        m for m in w4a4_run.student.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    assert all(isinstance(m, QuantModule) for m in layers)
    bits = [(m.weight_bits, m.act_bits) for m in layers]
    assert bits[0] == bits[-1] == (8, 8)
    assert set(bits[1:-1]) == {(4, 4)}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in w4a4_run.student.modules())


def test_every_choice_is_trained_quantized(w4a4_run) -> None:
    search = json.loads((w4a4_run.run_dir / "search.json").read_text())
    assert all(parse_choice(n)[1] == (4, 4) for n in search["result"]["names"])
    for name in search["table"]["candidates"][0]:
        ckpt = torch.load(
            next((w4a4_run.run_dir / "candidates").glob(f"000_*/{name}.pt")), weights_only=False
        )
        assert ckpt["metrics"]["init"].startswith("float ")  # started from its float candidate


def test_qdq_export_runs_and_agrees_within_one_step(w4a4_run, tiny_images) -> None:
    proto = onnx.load(str(w4a4_run.run_dir / "student.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = tiny_images[:1]
    (got,) = ort_session(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        expected = w4a4_run.student(x).numpy()
    assert np.abs(got - expected).max() <= output_step(w4a4_run.student)


def test_report_states_bits_storage_size_and_fp32_latency(w4a4_run) -> None:
    q = w4a4_run.report["quantization"]
    assert q["bits"] == "w4a4" and q["first_last"] == "w8a8"
    assert any("4-bit as " in key for key in q["storage"])
    assert q["size_bits"] == model_size_bits(w4a4_run.student)
    assert q["size_bits"] == w4a4_run.report["student"]["size_bits"]  # the ILP's size is exact
    assert q["fp32_student_ms"] > 0 and q["qdq_student_ms"] > 0
    assert (w4a4_run.run_dir / "student_fp32.onnx").exists()
    assert "## Quantization" in (w4a4_run.run_dir / "report.md").read_text()


def test_mixed_precision_meets_the_size_budget(tmp_path, tiny_teacher, tiny_images) -> None:
    kilobytes = 0.03 * model_size_bits(tiny_teacher) / 8e3  # 3% of the teacher, in bytes
    run = _convert(
        tiny_teacher,
        tiny_images,
        tmp_path / "auto",
        bits="auto",
        bit_choices="w8a8,w2a4",
        size_budget=f"{kilobytes:.3f}kB",
    )
    search = json.loads((run.run_dir / "search.json").read_text())
    budget = search["budgets"]["size_bits"]
    assert budget == pytest.approx(kilobytes * 8e3, rel=1e-4)
    measured = model_size_bits(run.student)
    predicted = search["result"]["totals"]["size_bits"]
    assert predicted <= budget
    # blocks sized alone each hold their input grid's step; assembled, a block reads its
    # neighbour's grid (one 32-bit step fewer per shared boundary at most)
    boundaries = len(search["table"]["candidates"])
    assert predicted - 32 * boundaries <= measured <= predicted
    names = search["table"]["candidates"][0]
    assert any(n.endswith("@w8a8") for n in names) and any(n.endswith("@w2a4") for n in names)


def test_qonnx_export_of_a_quantized_run(w4a4_run, capsys) -> None:
    pytest.importorskip("qonnx")
    from archnet.cli import main

    assert main(["export", "--run", str(w4a4_run.run_dir), "--format", "qonnx"]) == 0
    out = capsys.readouterr().out
    assert (w4a4_run.run_dir / "student.qonnx.onnx").is_file()
    assert "Quant nodes" in out and "agrees with PyTorch" in out and "bit operations" in out


def test_integer_chip_costs_bit_widths_by_estimate(tmp_path, tiny_teacher, tiny_images) -> None:
    """archnet-5op-int with --bits auto: every width of every choice is costed by the bitops
    model (labelled estimated), the ILP picks widths under the budget, and the student's QONNX
    export is estimated at exactly the search's figure."""
    pytest.importorskip("qonnx")
    from archnet.quant.qonnx import write_qonnx
    from archnet.stages.assemble import load_student
    from archnet.store import open_store, read_json
    from archnet.targets import load_target

    run = _convert(
        tiny_teacher,
        tiny_images,
        tmp_path / "int",
        bits="auto",
        target="archnet-5op-int",
        candidates="archnet_conv,skip",
        budget="0.3",
    )
    rep = run.report
    assert rep["latency"]["estimated"] and rep["latency"]["backend"] == "bitops"
    search = read_json(run.run_dir / "search.json")
    widths = {n.split("@")[1] for n in search["result"]["names"] if "@" in n}
    assert widths and widths <= {"w8a8", "w4a4", "w2a4"}
    table, lowered = search["table"], 0
    for names, costs in zip(table["candidates"], table["costs"]["latency_ms"]):
        by_name = dict(zip(names, costs))
        for name in names:  # a lower width of the same candidate is estimated cheaper
            twin = name.replace("@w8a8", "@w2a4")
            if name.endswith("@w8a8") and twin in by_name:
                assert by_name[twin] < by_name[name]
                lowered += 1
    assert lowered > 0
    s = rep["student"]
    assert s["latency_ms"] == pytest.approx(s["predicted_latency_ms"], rel=1e-9)
    assert s["latency_ms"] <= rep["budgets"]["latency_ms"]
    store = open_store(run.run_dir)
    backend = load_target("archnet-5op-int").latency_backend()
    shape = (1, *store.prepared.input_size)
    found = write_qonnx(load_student(store), shape, tmp_path / "s.qonnx.onnx", tiny_images[:2])
    assert backend.estimate_ms(found) == pytest.approx(s["predicted_latency_ms"], rel=1e-9)


def test_archnet_mode_student_is_integer_only(tmp_path, tiny_teacher, tiny_images) -> None:
    """Arch-Distillation trains the quantized student; every conv and FC computes on integers."""
    import onnx

    from archnet.targets import check_model, load_target, quantized_tensors
    from archnet.targets.qdq import float_compute_nodes

    run = _convert(
        tiny_teacher,
        tiny_images,
        tmp_path / "arch",
        bits="w4a4",
        target="archnet-5op-int",
        candidates="archnet_conv,skip",
        budget="10.0",  # QDQ runs slower than float on onnxruntime: no budget is tested here
    )
    assert run.report["mode"] == "archnet"
    proto = onnx.load(str(run.run_dir / "student.onnx"))
    assert check_model(proto, load_target("archnet-5op-int")) == []
    assert float_compute_nodes(proto) == []
    assert {t.declared_bits for t in quantized_tensors(proto)} == {4, 8}  # each proven above
