"""The conversion over a run directory: artifacts, typed results, the chosen student, resume."""

from __future__ import annotations

import json
import math
import shutil
from copy import deepcopy

import numpy as np
import onnx
import pytest
import torch

from archnet import ArchnetError, convert, resume
from archnet.choices import build_choice
from archnet.config import ConvertConfig
from archnet.onnx_utils import ort_outputs
from archnet.search import InfeasibleBudget
from archnet.stages import NAMES, STAGES, run_stages
from archnet.stages.latency import check_budgets
from archnet.store import RunLocked, RunStore, open_store
from tests.conftest import tiny_config

REQUIRED_FILES = [
    "config.toml",
    "prepare.json",
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


def copy_run(finished_run, tmp_path, name: str = "copy"):
    dst = tmp_path / name
    shutil.copytree(finished_run.run_dir, dst)
    return dst


def test_run_directory_holds_every_artifact(finished_run):
    for name in REQUIRED_FILES:
        assert (finished_run.run_dir / name).is_file(), name
    assert list((finished_run.run_dir / "candidates").rglob("*.pt"))


def test_every_stage_result_reads_back_as_its_type(finished_run):
    store = open_store(finished_run.run_dir)
    assert set(store.done()) == set(NAMES) - {"prepare"}
    for stage in STAGES:
        if stage.file:
            assert isinstance(store.load(stage.file, stage.result), stage.result), stage.name


def test_three_disjoint_splits(finished_run, tiny_images):
    data = torch.load(finished_run.run_dir / "data.pt", weights_only=True)
    splits = finished_run.report["splits"]
    assert splits["train"] + splits["selection"] == len(tiny_images)  # eval was given
    assert splits["eval"] == len(data["eval_images"]) == 64
    rows = {
        k: {tuple(r.flatten().tolist()) for r in data[f"{k}_images"]}
        for k in splits
        if k != "eval_source"
    }
    assert not rows["train"] & rows["selection"]
    assert not rows["eval"] & (rows["train"] | rows["selection"])


def test_report_counts_the_built_student(finished_run):
    rep = finished_run.report
    s = rep["student"]
    # counted on the built network and predicted from the per-candidate table: one answer
    assert (s["params"], s["macs"], s["size_bits"]) == (
        s["search_params"],
        s["search_macs"],
        s["search_size_bits"],
    )
    assert s["onnx_file_bytes"] == (finished_run.run_dir / "student.onnx").stat().st_size
    assert s["predicted_latency_ms"] <= rep["budgets"]["latency_ms"] + 1e-9
    md = (finished_run.run_dir / "report.md").read_text()
    assert "prediction error" in md and "additivity error" in md


def test_agreement_matches_the_exported_networks(finished_run, tiny_eval):
    """The reported agreement, recomputed from the two ONNX files in onnxruntime."""
    run = finished_run.run_dir
    got = {
        n: ort_outputs(onnx.load(str(run / f"{n}.onnx")), tiny_eval.images)
        for n in ("teacher", "student")
    }
    same = float((got["student"].argmax(1) == got["teacher"].argmax(1)).mean())
    assert finished_run.report["agreement"]["argmax_agreement"] == pytest.approx(same, abs=1 / 64)
    top1 = 100 * float((got["student"].argmax(1) == tiny_eval.labels.numpy()).mean())
    assert finished_run.report["student"]["top1"] == pytest.approx(top1, abs=100 / 64)


def test_student_holds_each_chosen_module(finished_run, tiny_teacher):
    store = open_store(finished_run.run_dir)
    names = finished_run.report["blocks"]
    assert any(b["choice"] != "teacher" for b in names)
    for spec, block in zip(store.prepared.specs, names):
        expected = build_choice(block["choice"], spec, tiny_teacher.get_submodule(spec.name))
        got = finished_run.student.get_submodule(spec.name)
        assert type(got) is type(expected), spec.name
        shapes = {k: v.shape for k, v in got.state_dict().items()}
        assert shapes == {k: v.shape for k, v in expected.state_dict().items()}, spec.name


def test_resume_retrains_only_a_damaged_candidate(finished_run, tmp_path):
    copy = copy_run(finished_run, tmp_path)
    ckpts = [p for p in (copy / "candidates").rglob("*.pt") if p.stem != "teacher"]
    victim = ckpts[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    mtimes = {p: p.stat().st_mtime_ns for p in ckpts if p != victim}
    store = open_store(copy)
    run_stages(store, until="distill")
    assert store.load("distill.json", STAGES[NAMES.index("distill")].result).trained == 1
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert "search" not in store.done()  # everything after the damaged stage runs again


def test_existing_run_needs_resume(finished_run, tiny_teacher, tiny_images):
    with pytest.raises(ArchnetError, match="--resume"):
        convert(tiny_teacher, tiny_images, out=finished_run.run_dir, config=tiny_config())


def test_resume_refuses_options_that_fix_the_inputs(finished_run, tmp_path):
    copy = copy_run(finished_run, tmp_path)
    cfg = ConvertConfig.from_dict(open_store(copy).config.to_dict())
    cfg.seed, cfg.max_selection = 7, 3
    with pytest.raises(ArchnetError, match="seed.*max_selection|max_selection.*seed"):
        resume(copy, cfg)


def test_resume_refuses_another_teacher(
    finished_run, tmp_path, tiny_teacher, tiny_images, tiny_eval
):
    copy = copy_run(finished_run, tmp_path)
    changed = deepcopy(tiny_teacher)
    with torch.no_grad():
        changed.fc.bias.add_(1.0)
    with pytest.raises(ArchnetError, match="another teacher or other data"):
        convert(
            changed,
            tiny_images,
            budget=0.7,
            out=copy,
            eval_data=tiny_eval,
            resume=True,
            config=tiny_config(),
        )


def test_resume_with_a_new_budget_reruns_from_the_search(finished_run, tmp_path, capsys):
    copy = copy_run(finished_run, tmp_path)
    ckpts = {p: p.stat().st_mtime_ns for p in (copy / "candidates").rglob("*.pt")}
    cfg = ConvertConfig.from_dict(open_store(copy).config.to_dict())
    cfg.budget = "1.2"
    result = resume(copy, cfg)
    assert "stages from search on run again" in capsys.readouterr().err
    assert result.report["budget_spec"] == "1.2"
    assert all(p.stat().st_mtime_ns == t for p, t in ckpts.items())


def test_harmful_fine_tune_is_not_kept(finished_run, tmp_path):
    copy = copy_run(finished_run, tmp_path)
    cfg = ConvertConfig.from_dict(open_store(copy).config.to_dict())
    cfg.finetune.lr = 5.0  # diverges
    e2e = resume(copy, cfg).report["end_to_end"]
    # worse than before, or NaN: at this rate the fine-tune diverges, to inf or to NaN
    # depending on the run (a clean-clone suite saw NaN)
    after = e2e["selection_kl_after"]
    assert math.isnan(after) or after > e2e["selection_kl_before"]
    assert e2e["kept"] == "assembled"


def test_a_locked_run_is_refused(finished_run, tmp_path):
    copy = copy_run(finished_run, tmp_path)
    with open_store(copy).locked(), pytest.raises(RunLocked, match="in use by another"):
        resume(copy)


def test_infeasible_budget_fails_before_any_training(tiny_teacher, tiny_images, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(InfeasibleBudget, match="infeasible"):
        convert(tiny_teacher, tiny_images, budget="0.0001ms", out=out, config=tiny_config())
    done = open_store(out).done()
    assert "latency" in done and "features" not in done
    assert not (out / "candidates").exists()
    # the measured table stays: a feasible budget goes on from here
    cfg = ConvertConfig.from_dict(open_store(out).config.to_dict())
    cfg.budget = "2.0"
    check_budgets(RunStore(out, cfg))


def test_same_seed_and_latency_cache_give_the_same_student(
    finished_run, tmp_path, tiny_teacher, tiny_images, tiny_eval
):
    cache = tmp_path / "shared.sqlite"
    shutil.copy(finished_run.run_dir / "latency.sqlite", cache)
    cfg = tiny_config()
    cfg.latency.cache = str(cache)
    again = convert(
        tiny_teacher,
        tiny_images,
        budget=0.7,
        out=tmp_path / "again",
        eval_data=tiny_eval,
        config=cfg,
    )
    assert [b["choice"] for b in again.report["blocks"]] == [
        b["choice"] for b in finished_run.report["blocks"]
    ]
    first, second = finished_run.student.state_dict(), again.student.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    latency = json.loads((tmp_path / "again" / "latency.json").read_text())
    assert latency["cache_hits"] > 0
    assert np.isclose(
        latency["teacher_predicted_ms"],
        json.loads((finished_run.run_dir / "latency.json").read_text())["teacher_predicted_ms"],
    )


def test_the_search_skips_the_block_that_matters_least(
    tmp_path, tiny_teacher, tiny_images, tiny_eval
):
    """One block is made nearly an identity, the others compute: a parameter budget that forces
    one block out must take out that one, and only that one."""
    from archnet.flops import count_params

    teacher = deepcopy(tiny_teacher)
    quiet = teacher.get_submodule("layer2.1")
    with torch.no_grad():  # its residual branch almost vanishes: skipping it changes little
        quiet.bn2.weight.mul_(0.02)
        quiet.bn2.bias.mul_(0.02)
    budget = count_params(teacher) - count_params(quiet) + 10
    cfg = tiny_config(candidates="skip", params_budget=str(budget))
    result = convert(
        teacher, tiny_images, budget=10, out=tmp_path / "r", eval_data=tiny_eval, config=cfg
    )
    chosen = {b["block"]: b["choice"] for b in result.report["blocks"]}
    assert chosen == {name: "skip" if name == "layer2.1" else "teacher" for name in chosen}


def test_arch_net_run_with_its_ablation_over_seeds(tmp_path, tiny_teacher, tiny_images, tiny_eval):
    cfg = tiny_config(target="archnet-5op", candidates="archnet_conv,skip", ablation=True)
    cfg.ablation_seeds = 2
    cfg.arch.epochs_per_stage, cfg.arch.global_epochs = 0.25, 1
    result = convert(
        tiny_teacher,
        tiny_images,
        "archnet-5op",
        budget=2.0,
        out=tmp_path / "a",
        eval_data=tiny_eval,
        config=cfg,
    )
    rep = result.report
    assert rep["mode"] == "archnet" and rep["onnx"]["student_violations"] == 0
    assert set(rep["ablation"]) == {
        "full method",
        "without Teacher Attention",
        "without Residual Feature Adaptation",
        "without the progressive schedule",
    }
    for row in rep["ablation"].values():
        assert row["seeds"] == [0, 1] and len(row["top1"]) == len(row["kl"]) == 2
        assert min(row["top1"]) <= row["top1_mean"] <= max(row["top1"])
    assert len(list((tmp_path / "a" / "ablation").glob("*.json"))) == 8  # one per variant and seed
    assert "± " in (tmp_path / "a" / "report.md").read_text()


def test_a_student_measured_over_budget_is_searched_again(finished_run, tmp_path, monkeypatch):
    """The export measures the student 1.3x over its budget (as a runtime that
    does not fuse what the table timed apart would): the run divides the enforced budget by
    the measured correction and searches once more; a later resume does not correct again."""
    from archnet.api import finish
    from archnet.targets.latency import OnnxRuntimeBackend

    copy = copy_run(finished_run, tmp_path)
    store = open_store(copy)
    store.config.budget_correction = True
    store.save_config()
    store.forget(["export", "ablation", "report"])
    first_limit = json.loads((copy / "search.json").read_text())["limits"]["latency_ms"]
    measure = OnnxRuntimeBackend.measure_interleaved

    rep = finished_run.report
    allowed = rep["budgets"]["latency_ms"] / rep["teacher"]["predicted_latency_ms"]

    def slower_student(self, items, *args, **kwargs):
        times = measure(self, items, *args, **kwargs)
        if "student" in times:  # 1.3x what the budget allows, whatever the machine measured
            times["student"] = times["teacher"] * allowed * 1.3
        return times

    monkeypatch.setattr(OnnxRuntimeBackend, "measure_interleaved", slower_student)
    report = finish(store).report
    correction = open_store(copy).config.latency_correction
    assert correction > 1.3 and report["latency_correction"] == correction
    second_limit = json.loads((copy / "search.json").read_text())["limits"]["latency_ms"]
    assert second_limit == pytest.approx(first_limit / correction)
    assert finish(open_store(copy)).report["latency_correction"] == correction  # once
