import json
import shutil

import pytest
import torch

from archnet.pipeline import STAGES, convert, create_run, open_run, run_stages
from tests.conftest import tiny_config

REQUIRED_FILES = [
    "config.toml",
    "latency.sqlite",
    "search.json",
    "student.pt",
    "student.onnx",
    "teacher.onnx",
    "report.md",
    "report.json",
    "pareto.png",
    "blocks.png",
]


def test_run_directory_holds_every_artifact(finished_run):
    for name in REQUIRED_FILES:
        assert (finished_run.run_dir / name).is_file(), name
    jobs = list((finished_run.run_dir / "candidates").rglob("*.pt"))
    assert len(jobs) > 0


def test_report_has_required_keys_and_consistent_numbers(finished_run):
    rep = json.loads((finished_run.run_dir / "report.json").read_text())
    for key in ("latency_ms", "predicted_latency_ms", "sum_of_parts_ms", "top1"):
        assert key in rep["teacher"] and key in rep["student"]
    assert rep["speedup"] == pytest.approx(
        rep["teacher"]["latency_ms"] / rep["student"]["latency_ms"]
    )
    assert rep["student"]["predicted_latency_ms"] <= rep["budgets"]["latency_ms"] + 1e-9
    assert rep["onnx"]["student_max_abs_diff"] < 1e-3
    assert set(rep["stage_seconds"]) >= set(STAGES) - {"report"}  # written by the report itself
    md = (finished_run.run_dir / "report.md").read_text()
    assert "measured latency" in md and "Pareto" in md


def test_student_is_the_assembled_choice(finished_run):
    search = json.loads((finished_run.run_dir / "search.json").read_text())
    names = search["result"]["names"]
    blocks = search["table"]["blocks"]
    student = finished_run.student
    for block, choice in zip(blocks, names):
        if choice == "skip":
            assert type(student.get_submodule(block)).__name__ != "BasicBlock"
    out = student(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_resume_skips_finished_work(finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    run = open_run(copy)
    victim = next(p for p in (copy / "candidates").rglob("*.pt") if p.stem != "teacher")
    mtimes = {p: p.stat().st_mtime_ns for p in (copy / "candidates").rglob("*.pt") if p != victim}
    victim.unlink()
    run.invalidate("distill")  # as if the run had been killed during blockwise distillation
    run_stages(run, until="distill")
    assert victim.exists()  # the missing candidate was trained again ...
    for p, t in mtimes.items():  # ... and no finished one was touched
        assert p.stat().st_mtime_ns == t
    assert run.state["done"]["distill"]["trained"] == 1


def test_existing_run_needs_resume(finished_run, tiny_teacher, tiny_images):
    from archnet.errors import ArchnetError

    with pytest.raises(ArchnetError, match="--resume"):
        create_run(tiny_teacher, tiny_images, tiny_config(), finished_run.run_dir)


def test_search_resolves_without_retraining(finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    run = open_run(copy)
    before = {p: p.stat().st_mtime_ns for p in (copy / "candidates").rglob("*.pt")}
    run.config.budget = "1.0"
    run.invalidate("search")
    run_stages(run, until="search")
    tight = json.loads((copy / "search.json").read_text())["result"]
    assert (
        tight["budgets"]["latency_ms"]
        >= json.loads((finished_run.run_dir / "search.json").read_text())["result"]["budgets"][
            "latency_ms"
        ]
    )
    assert "assemble" not in run.state["done"]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_infeasible_budget_names_the_minimum(tiny_teacher, tiny_images, tmp_path):
    from archnet.errors import ArchnetError

    with pytest.raises(ArchnetError, match="infeasible"):
        convert(
            tiny_teacher, tiny_images, budget="0.0001ms", out=tmp_path / "r", config=tiny_config()
        )
