"""The search stage's re-ranking: the ILP's best students tried with a short fine-tune each."""

from __future__ import annotations

import shutil

import pytest

from archnet import resume
from archnet.config import ConvertConfig
from archnet.results import SearchOutcome
from archnet.stages import later, run_stages
from archnet.stages.search import rerank_distance
from archnet.store import open_store


@pytest.fixture(scope="module")
def reranked(finished_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("rerank") / "run"
    shutil.copytree(finished_run.run_dir, copy)
    cfg = ConvertConfig.from_dict(open_store(copy).config.to_dict())
    cfg.rerank, cfg.rerank_samples = 3, 32
    return copy, resume(copy, cfg).report


def test_rerank_keeps_the_student_closest_after_the_pass(reranked):
    _, rep = reranked
    rows = rep["search"]["reranked"]
    assert len(rows) >= 2
    objectives = [r["objective"] for r in rows]
    assert objectives == sorted(objectives)  # the ILP's order: best summed score first
    apart = rerank_distance(len(rep["blocks"]))
    assert apart >= 2
    for i, row in enumerate(rows):  # alternatives, not twins
        assert all(sum(a != b for a, b in zip(row["names"], o["names"])) >= apart for o in rows[:i])
        assert row["kl_recovered"] >= 0 and row["kl_assembled"] >= 0
    best = min(rows, key=lambda r: r["kl_recovered"])
    assert [r["names"] for r in rows if r["chosen"]] == [best["names"]]
    assert [b["choice"] for b in rep["blocks"]] == best["names"]
    assert len({r["kl_recovered"] for r in rows}) == len(rows)  # each student really trained


def test_rerank_resumes_from_the_students_tried(reranked, monkeypatch):
    run, rep = reranked
    store = open_store(run)
    store.forget(later("search"))

    def refuse(*_a, **_k):
        raise AssertionError("a student already tried was fine-tuned again")

    monkeypatch.setattr("archnet.stages.search.finetune", refuse)
    run_stages(store, until="search")
    again = store.load("search.json", SearchOutcome).reranked
    assert again == [
        {k: v for k, v in r.items() if k != "chosen"} for r in rep["search"]["reranked"]
    ]
