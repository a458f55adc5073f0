"""The score stage resumes choice by choice: a killed stage never scores a choice twice."""

from __future__ import annotations

import shutil

import pytest

import archnet.stages.score as score_stage
from archnet.results import ScoreResult
from archnet.stages import later, run_stages
from archnet.store import open_store


def test_a_killed_score_stage_resumes_where_it_stopped(finished_run, tmp_path, monkeypatch):
    root = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, root)
    for part in root.glob("candidates/*/*.score.json"):
        part.unlink()
    store = open_store(root)
    store.forget(later("score"))
    real, calls = score_stage.replace_one_block, []

    def dies_after_three(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(score_stage, "replace_one_block", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_stages(store, until="score")
    assert len(list(root.glob("candidates/*/*.score.json"))) == 3

    monkeypatch.setattr(
        score_stage, "replace_one_block", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    run_stages(store, until="score")
    total = len(list(root.glob("candidates/*/*.score.json")))
    assert len(calls) == total  # three before the kill, each of the rest once after
    assert open_store(root).load("scores.json", ScoreResult).scores
