"""The distill stage: every candidate and choice trained against its block's cached features."""

from __future__ import annotations

from archnet.distill.blockwise import CandidateJob, read_checkpoint, run_jobs, steps_per_job
from archnet.results import DistillResult, PoolResult
from archnet.stages import common
from archnet.store import RunStore


def all_jobs(store: RunStore, choices_only: bool = False) -> list[CandidateJob]:
    jobs = common.jobs(store, store.load("pool.json", PoolResult), choices_only)
    for job in jobs:
        job.fingerprint = store.prepared.fingerprint
    return jobs


def run(store: RunStore) -> DistillResult:
    cfg, seed = store.config.blockwise, store.config.seed
    jobs = all_jobs(store)
    n = store.prepared.splits["train"]
    todo = [j for j in jobs if not j.done(cfg, seed)]
    trained = [j for j in todo if j.name != "teacher"]  # the teacher's block has nothing to learn
    blocks = {s.name: common.teacher_block(store, s) for s in common.specs(store)}
    executor = common.executor(store)
    board = common.job_board(store, "distill", len(jobs), len(jobs) - len(todo), executor)
    with common.progress_bar() as bar:
        task = bar.add_task(
            f"blockwise distillation ({len(jobs)} jobs, {len(jobs) - len(todo)} done before, "
            f"{executor.name})",
            total=sum(steps_per_job(n, cfg, j.bits is not None) for j in trained),
        )
        per_job = bar.add_task(f"  jobs: {board.summary()}", total=len(jobs))
        bar.update(per_job, completed=len(jobs) - len(todo))

        finished = [0]

        def done(job: CandidateJob, metrics: dict) -> None:
            board.finish()
            bar.update(per_job, advance=1, description=f"  jobs: {board.summary()}")
            if job.name != "teacher":  # a job without parameters takes no steps: count them
                finished[0] += steps_per_job(n, cfg, job.bits is not None)
                bar.update(task, completed=finished[0])

        def failed(job: CandidateJob, error: str) -> None:
            board.fail(f"{job.spec.name}/{job.name}", error)
            bar.update(per_job, description=f"  jobs: {board.summary()}")

        failures = run_jobs(
            jobs,
            blocks,
            store.path("features"),
            cfg,
            seed,
            done,
            on_step=lambda: bar.advance(task),
            executor=executor,
            device=common.device(store),
            on_job_failed=failed,
        )
    common.raise_failed("candidate", failures, len(todo))
    nmse: dict[str, dict[str, float]] = {}
    for job in jobs:
        ckpt = read_checkpoint(job.path)
        nmse.setdefault(job.spec.name, {})[job.name] = ckpt["metrics"]["val_nmse"]
    return DistillResult(jobs=len(jobs), trained=len(trained), val_nmse=nmse)


def verify(store: RunStore) -> str | None:
    """Why a finished distill stage cannot be trusted: a checkpoint lost, truncated or stale."""
    cfg, seed = store.config.blockwise, store.config.seed
    bad = [j for j in all_jobs(store) if not j.done(cfg, seed)]
    if bad:
        return (
            f"{len(bad)} candidate checkpoint(s) missing, unreadable or stale (e.g. {bad[0].path})"
        )
    return None
