"""Candidate jobs on every executor: the same checkpoints in this process, in a process pool
and on a local Ray cluster (float and quantized jobs, the latter started from the former); a
Ray worker killed with SIGKILL mid-job is retried to the same result; a changed setting
retrains exactly the jobs whose result depends on it."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch

from archnet.distill.blockwise import (
    BlockwiseConfig,
    CandidateJob,
    TrainShared,
    plan_jobs,
    run_jobs,
    train_job,
    write_checkpoint,
)
from archnet.executors import build_executor
from tests.distill.test_blockwise import CFG, teacher_and_cache  # noqa: F401 (fixture)

PICKS = [(1, "mbconv_k3_e3_relu"), (1, "mbconv_k3_e3_relu@w4a4"), (2, "skip"), (2, "teacher@w8a8")]


def _jobs(specs, out: Path) -> list[CandidateJob]:
    return [CandidateJob(i, specs[i], name, out / f"{i}_{name}.pt") for i, name in PICKS]


def _blocks(teacher, specs):
    return {s.name: teacher.get_submodule(s.name) for s in specs}


def _states(jobs) -> dict[str, dict]:
    return {
        j.name: torch.load(j.path, map_location="cpu", weights_only=False)["state_dict"]
        for j in jobs
    }


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:  # same seed, same data, one thread each: identical
            assert torch.equal(a[name][k], b[name][k]), (name, k)


@pytest.fixture(scope="module")
def in_process(teacher_and_cache, tmp_path_factory):  # noqa: F811
    teacher, specs, root = teacher_and_cache
    jobs = _jobs(specs, tmp_path_factory.mktemp("inprocess"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs: kernels then sum in the same order
    try:
        run_jobs(jobs, _blocks(teacher, specs), root, CFG, 7, lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return _states(jobs)


@pytest.mark.parametrize("name", ["process", "ray"])
def test_executor_gives_the_same_checkpoints(
    name,
    in_process,
    teacher_and_cache,  # noqa: F811
    tmp_path,
    request,
):
    if name == "ray":
        request.getfixturevalue("ray_cluster")
    teacher, specs, root = teacher_and_cache
    jobs = _jobs(specs, tmp_path)
    done = []
    failed = run_jobs(
        jobs,
        _blocks(teacher, specs),
        root,
        CFG,
        7,
        lambda job, _m: done.append(job.name),
        executor=build_executor(name, workers=2),
    )
    assert failed == [] and sorted(done) == sorted(n for _, n in PICKS)
    _same(_states(jobs), in_process)


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_once_mid_job(shared: TrainShared, job: CandidateJob, needed):
    """``train_job``, but the first attempt of each job kills its worker at its first step."""
    marker = job.path.with_suffix(".attempted")
    if not marker.exists():
        marker.touch()
        shared = dataclasses.replace(shared, on_step=_sigkill_self)
    return train_job(shared, job, needed)


def test_ray_worker_killed_mid_job_is_retried(in_process, teacher_and_cache, tmp_path, ray_cluster):  # noqa: F811
    teacher, specs, root = teacher_and_cache
    jobs = _jobs(specs, tmp_path)
    work, needed = plan_jobs(jobs, CFG, 7)
    shared = TrainShared(_blocks(teacher, specs), str(root), CFG, 7)
    tmp_path.mkdir(exist_ok=True)
    for outcome in build_executor("ray").run(die_once_mid_job, shared, work, needed):
        assert outcome.error is None, outcome.error
        write_checkpoint(outcome.job.payload.path, outcome.result["checkpoint"])
    assert all(j.path.with_suffix(".attempted").exists() for j in jobs)  # every job was killed
    _same(_states(jobs), in_process)


def test_changed_setting_retrains_exactly_the_affected_jobs(teacher_and_cache, tmp_path):  # noqa: F811
    teacher, specs, root = teacher_and_cache
    jobs = _jobs(specs, tmp_path)
    run_jobs(jobs, _blocks(teacher, specs), root, CFG, 7, lambda *_: None)
    assert plan_jobs(jobs, CFG, 7)[0] == []  # resumed unchanged: nothing to do

    def retrained(cfg: BlockwiseConfig, seed: int = 7) -> list[str]:
        return sorted(j.payload.name for j in plan_jobs(jobs, cfg, seed)[0])

    quantized = sorted(n for _, n in PICKS if "@" in n)
    assert retrained(dataclasses.replace(CFG, quant_epochs=CFG.quant_epochs + 1)) == quantized
    assert retrained(dataclasses.replace(CFG, workers=4)) == []  # where, not what
    assert retrained(dataclasses.replace(CFG, lr=CFG.lr / 2)) == sorted(n for _, n in PICKS)
    assert retrained(dataclasses.replace(CFG, amp=True)) == sorted(n for _, n in PICKS)
    # a quantized job after its float job, the one trained earlier read from disk
    work, needed = plan_jobs(jobs, dataclasses.replace(CFG, quant_epochs=9), 7)
    after = {w.payload.name: w.after for w in work}
    assert after["teacher@w8a8"] is None and after["mbconv_k3_e3_relu@w4a4"] in needed


def test_a_quantized_job_is_keyed_by_its_quantization_points():
    from archnet.blocks import BlockSpec
    from archnet.distill.blockwise import BlockwiseConfig, CandidateJob

    spec = BlockSpec("b", (8, 4, 4), (8, 4, 4))
    jobs = [CandidateJob(0, spec, name, Path("x.pt")) for name in ("c", "c@w8a8")]
    inputs = [dataclasses.replace(j, requantize=False) for j in jobs]
    cfg = BlockwiseConfig()
    assert jobs[0].key(cfg, 0) == inputs[0].key(cfg, 0)  # a float job has no points
    assert jobs[1].key(cfg, 0) != inputs[1].key(cfg, 0)
