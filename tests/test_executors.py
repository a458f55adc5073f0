"""Executors: the same outcomes in this process, in a process pool and on a local Ray
cluster; dependencies without barriers; a failing job reported while the others go on; a
worker killed with SIGKILL replaced and its job run again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from archnet.errors import ArchnetError
from archnet.executors import Job, build_executor


def square_plus(shared: int, payload, needed):
    """``shared * payload**2 + needed``; raises on 'boom'; dies once when payload is a path."""
    if payload == "boom":
        raise ValueError("boom")
    if isinstance(payload, str):  # a marker file: the first attempt kills its own process
        marker = Path(payload)
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return -1
    return shared * payload**2 + (needed or 0)


def _jobs() -> list[Job]:
    return [
        Job("b", 3, after="a"),  # listed before the job it depends on
        Job("a", 2),
        Job("c", 4, after="done-before"),
        Job("d", 1),
    ]


def _run(executor, jobs, needed=None) -> dict:
    return {o.job.key: o for o in executor.run(square_plus, 10, jobs, needed or {})}


@pytest.fixture(params=["inprocess", "process", "ray"])
def executor(request):
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return build_executor(request.param, workers=2)


def test_same_results_and_dependencies(executor):
    out = _run(executor, _jobs(), {"done-before": 5})
    assert {k: o.result for k, o in out.items()} == {"a": 40, "b": 130, "c": 165, "d": 10}
    assert not any(o.error for o in out.values())


def test_a_failure_stays_local(executor):
    jobs = [Job("x", "boom"), Job("y", 2, after="x"), Job("z", 3)]
    out = _run(executor, jobs)
    assert "ValueError: boom" in out["x"].error
    assert out["y"].error and out["y"].result is None  # it needed x
    assert out["z"].result == 90 and out["z"].error is None


@pytest.mark.parametrize("name", ["process", "ray"])
def test_killed_worker_is_replaced_and_its_job_rerun(name, tmp_path, request):
    if name == "ray":
        request.getfixturevalue("ray_cluster")
    executor = build_executor(name, workers=2)
    marker = tmp_path / "killed-once"
    out = _run(executor, [Job("k", str(marker)), Job("n", 2)])
    assert marker.exists()  # the first attempt did die
    assert out["k"].result == -1 and out["k"].error is None
    assert out["n"].result == 40


def test_unknown_executor_and_dependency():
    with pytest.raises(ArchnetError, match="inprocess, process, ray"):
        build_executor("slurm")
    with pytest.raises(ArchnetError, match="unknown job"):
        list(build_executor("inprocess").run(square_plus, 1, [Job("a", 1, after="?")], {}))
