"""A whole conversion with its candidate jobs on a local Ray cluster: the same candidates and
the same search result as in-process; latency jobs on the node carrying the target; a driver
interrupted mid-stage resumes to the uninterrupted result; `archnet status` on runs finished
and interrupted."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from archnet import convert
from archnet.cli import main
from archnet.store import read_json
from tests.conftest import tiny_config


def _choice(run) -> list[str]:
    return read_json(run / "search.json")["result"]["names"]


def test_ray_conversion_matches_in_process(
    finished_run, tiny_teacher, tiny_images, tiny_eval, tmp_path, ray_cluster
):
    out = tmp_path / "ray"
    cfg = tiny_config(executor="ray")
    cfg.latency.cache = str(finished_run.run_dir / "latency.sqlite")  # the same timings
    convert(tiny_teacher, tiny_images, budget=0.7, out=out, eval_data=tiny_eval, config=cfg)
    here, there = finished_run.run_dir, out
    assert _choice(there) == _choice(here)
    a, b = read_json(here / "distill.json"), read_json(there / "distill.json")
    for block, per in a["val_nmse"].items():  # one thread per worker vs this process's threads
        for name, value in per.items():
            assert b["val_nmse"][block][name] == pytest.approx(value, rel=1e-3, abs=1e-6)
    board = read_json(there / "jobs.json")
    assert board["executor"] == "ray" and board["done"] == board["total"] and not board["failed"]


def test_status_of_finished_and_interrupted_runs(finished_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    assert main(["status", "--run", str(copy)]) == 0
    text = capsys.readouterr().out
    assert "not running" in text and "report done" in text and "continue with" not in text
    assert "jobs (score" in text and "0 failed" in text  # the last job stage

    state = json.loads((copy / "state.json").read_text())  # as if killed during distill
    state["done"] = {k: v for k, v in state["done"].items() if k in ("prepare", "candidates")}
    (copy / "state.json").write_text(json.dumps(state))
    board = json.loads((copy / "jobs.json").read_text())
    board |= {"done": 3, "left": board["total"] - 3}
    (copy / "jobs.json").write_text(json.dumps(board))
    assert main(["status", "--run", str(copy)]) == 0
    text = capsys.readouterr().out
    assert "distill -" in text and f"3 done, 0 running, 0 failed, {board['total'] - 3} left" in text
    assert f"archnet convert --resume --out {copy}" in text

    assert main(["status", "--run", str(tmp_path / "nothing")]) == 2
    assert "not an archnet run" in capsys.readouterr().err


def test_latency_jobs_run_on_the_node_carrying_the_target(ray_cluster):
    from torch import nn

    from archnet.executors import build_executor
    from archnet.stages.latency import PinnedBackend
    from archnet.targets import load_target

    backend = load_target("cpu-ort").latency_backend()
    executor = build_executor("ray", resources={"target:cpu-ort": 1})
    pinned = PinnedBackend(backend, executor, "target:cpu-ort")
    assert pinned.cache_key() == backend.cache_key()  # one machine here: the same key
    items = {"wide": (nn.Linear(256, 256), (8, 256)), "narrow": (nn.Linear(256, 8), (8, 256))}
    times = pinned.measure_interleaved(items, rounds=2, warmup=2, repeats=10)
    assert set(times) == {"wide", "narrow"} and set(times.exporters) == set(times)
    assert times["wide"] > 0 and times["narrow"] > 0


def test_killed_driver_resumes_to_the_same_result(finished_run, tmp_path, monkeypatch):
    """The driver interrupted mid-distill (after 3 jobs came back): the checkpoints written so
    far are kept, and the resumed run ends with the uninterrupted run's candidates and
    choice."""
    from archnet.api import resume
    from archnet.stages import common

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    state = json.loads((copy / "state.json").read_text())
    state["done"] = {k: v for k, v in state["done"].items() if k in ("candidates", "latency")}
    (copy / "state.json").write_text(json.dumps(state))
    for ckpt in (copy / "candidates").rglob("*"):
        if ckpt.is_file():
            ckpt.unlink()

    def checkpoints(run) -> dict:
        return {
            p.relative_to(run): torch.load(p, weights_only=False)
            for p in (run / "candidates").rglob("*.pt")
        }

    real = common.executor

    class Interrupted:
        def __init__(self, inner):
            self.inner, self.name, self.in_process, self.slots = inner, "inprocess", True, 1

        def run(self, *args):
            for i, outcome in enumerate(self.inner.run(*args)):
                if i == 3:
                    raise KeyboardInterrupt
                yield outcome

    monkeypatch.setattr(common, "executor", lambda store: Interrupted(real(store)))
    with pytest.raises(KeyboardInterrupt):
        resume(copy)
    kept = list((copy / "candidates").rglob("*.pt"))
    assert len(kept) == 3 and not list((copy / "candidates").rglob("*.tmp"))
    monkeypatch.setattr(common, "executor", real)
    resume(copy)
    done, reference = checkpoints(copy), checkpoints(finished_run.run_dir)
    assert done.keys() == reference.keys()
    for rel, ckpt in reference.items():
        assert done[rel]["key"] == ckpt["key"]
        for k, v in ckpt["state_dict"].items():
            assert torch.equal(done[rel]["state_dict"][k], v), (rel, k)
    assert _choice(copy) == _choice(finished_run.run_dir)
