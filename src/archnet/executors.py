"""Where jobs run: this process, a pool of local processes, or a Ray cluster.

A job is a pure call ``fn(shared, payload, needed) -> result``: ``shared`` is what every job
of a stage reads (sent to each worker once), ``payload`` what this job is, ``needed`` the
result of the one job it depends on (``Job.after``; a quantized choice needs its trained float
candidate), or None. Executors yield each job's :class:`Outcome` as it finishes and never
write anything: the driver alone writes the run directory. A dependent job starts when its
dependency's result is in (no barrier between float and quantized jobs); when that one failed,
it fails too. Every executor gives the same results for the same jobs: a job's seed is its
own, never its position or its worker.

Failures stay local: a job that raises is reported (and the others go on); a worker process
that dies (killed, out of memory) is replaced and its jobs run again, at most ``max_retries``
times. Executors are built by name (:func:`build_executor`): ``inprocess``, ``process``,
``ray``.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from archnet.errors import ArchnetError

__all__ = [
    "EXECUTORS",
    "Executor",
    "InProcessExecutor",
    "Job",
    "Outcome",
    "ProcessExecutor",
    "RayExecutor",
    "build_executor",
]

JobFn = Callable[[Any, Any, Any], Any]


@dataclass
class Job:
    """One unit of work: ``key`` names what its result depends on (a content hash), ``after``
    the key of the job whose result it needs (one finished earlier may be in ``needed``)."""

    key: str
    payload: Any
    after: str | None = None
    label: str = ""


@dataclass
class Outcome:
    """A finished job: its result, or ``error`` (one line) when it failed."""

    job: Job
    result: Any = None
    error: str | None = None


class Executor(ABC):
    """Runs jobs and yields their outcomes as they finish (see the module docstring)."""

    name = ""
    in_process = False  # whether callbacks in ``shared`` (progress per step) are called

    @property
    @abstractmethod
    def slots(self) -> int:
        """Jobs that run at once (what an ETA divides by)."""

    @abstractmethod
    def run(
        self, fn: JobFn, shared: Any, jobs: list[Job], needed: dict[str, Any]
    ) -> Iterator[Outcome]:
        """Run ``jobs`` (each at most once); ``needed`` holds results of finished jobs that
        some of them depend on."""


EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(name: str):
    def add(cls: type[Executor]) -> type[Executor]:
        cls.name = name
        EXECUTORS[name] = cls
        return cls

    return add


def build_executor(name: str, **options: Any) -> Executor:
    """The executor called ``name`` (``inprocess``, ``process``, ``ray``) with ``options``."""
    try:
        cls = EXECUTORS[name]
    except KeyError:
        raise ArchnetError(
            f"--executor {name!r} is unknown; choose one of {', '.join(EXECUTORS)}"
        ) from None
    return cls(**options)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _unmet(job: Job, failed: set[str]) -> Outcome | None:
    if job.after in failed:
        return Outcome(job, error=f"the job it starts from ({job.after[:12]}) failed")
    return None


@register_executor("inprocess")
class InProcessExecutor(Executor):
    """Every job in this process, one after the other, in the order given (dependencies
    first)."""

    in_process = True

    def __init__(self, **_: Any) -> None:
        pass

    @property
    def slots(self) -> int:
        return 1

    def run(self, fn, shared, jobs, needed):
        results, failed = dict(needed), set()
        for job in _ordered(jobs, needed):
            if (out := _unmet(job, failed)) is None:
                try:
                    results[job.key] = fn(shared, job.payload, results.get(job.after))
                    out = Outcome(job, results[job.key])
                except Exception as e:  # one job's failure is reported, the others go on
                    out = Outcome(job, error=_error(e))
            if out.error:
                failed.add(job.key)
            yield out


def _ordered(jobs: list[Job], needed: dict[str, Any]) -> list[Job]:
    """``jobs`` with every job after the one it depends on (order otherwise kept)."""
    keys = {j.key for j in jobs}
    missing = [j for j in jobs if j.after and j.after not in keys and j.after not in needed]
    if missing:
        raise ArchnetError(f"job {missing[0].label or missing[0].key} depends on an unknown job")
    first = [j for j in jobs if not j.after or j.after not in keys]
    rest = [j for j in jobs if j.after and j.after in keys]
    return first + _ordered(rest, {**needed, **{j.key: None for j in first}}) if rest else first


# --- local processes ------------------------------------------------------------------------------

_SHARED: Any = None


def _worker_init(shared: Any, threads: int) -> None:
    global _SHARED
    import torch

    torch.set_num_threads(threads)
    _SHARED = shared


def _worker_call(fn: JobFn, payload: Any, needed: Any) -> Any:
    return fn(_SHARED, payload, needed)


@register_executor("process")
class ProcessExecutor(Executor):
    """A pool of ``workers`` local processes (spawned, ``threads`` torch threads each);
    ``shared`` is sent to each worker once. A worker that dies breaks the pool: it is
    replaced and the jobs that were running run again."""

    def __init__(self, workers: int = 2, threads: int = 1, max_retries: int = 2, **_: Any):
        self.workers, self.threads, self.max_retries = max(1, workers), threads, max_retries

    @property
    def slots(self) -> int:
        return self.workers

    def _pool(self, shared):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(
            self.workers, mp.get_context("spawn"), _worker_init, (shared, self.threads)
        )

    def run(self, fn, shared, jobs, needed):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        results, failed = dict(needed), set()
        pending, running, attempts = _ordered(jobs, needed), {}, {}
        pool = self._pool(shared)
        try:
            while pending or running:
                for job in list(pending):
                    if (out := _unmet(job, failed)) is not None:
                        pending.remove(job)
                        failed.add(job.key)
                        yield out
                    elif not job.after or job.after in results:
                        pending.remove(job)
                        attempts[job.key] = attempts.get(job.key, 0) + 1
                        future = pool.submit(_worker_call, fn, job.payload, results.get(job.after))
                        running[future] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    job = running.pop(future)
                    try:
                        results[job.key] = future.result()
                    except BrokenProcessPool:
                        broken = True
                        if attempts[job.key] > self.max_retries:
                            failed.add(job.key)
                            yield Outcome(job, error="its worker died")
                        else:
                            pending.insert(0, job)
                        continue
                    except Exception as e:
                        failed.add(job.key)
                        yield Outcome(job, error=_error(e))
                        continue
                    yield Outcome(job, results[job.key])
                if broken:  # every job still running went down with the pool: run them again
                    pending[:0] = list(running.values())
                    running.clear()
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = self._pool(shared)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --- Ray ------------------------------------------------------------------------------------------


def _ray_call(fn: JobFn, shared: Any, payload: Any, needed: Any, threads: int):
    import torch

    torch.set_num_threads(threads)
    return fn(shared, payload, needed)


@register_executor("ray")
class RayExecutor(Executor):
    """Ray tasks on the cluster at ``address`` (None: a local one, started here), each asking
    for ``cpus`` CPUs, ``gpus`` GPUs (fractions share a GPU) and custom ``resources`` (a
    target's name pins latency jobs to the nodes that carry it). ``shared`` goes into the
    object store once; a dependent task is handed its dependency's object reference, so Ray
    starts it as soon as that result exists. A task whose worker dies is retried by Ray
    (``max_retries``); a task that raises is not (the same inputs would raise again)."""

    def __init__(
        self,
        address: str | None = None,
        cpus: float = 1.0,
        gpus: float = 0.0,
        resources: dict[str, float] | None = None,
        max_retries: int = 2,
        **_: Any,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ArchnetError(
                "--executor ray needs Ray: pip install 'archnet[ray]' (or pip install ray)"
            ) from None
        if not ray.is_initialized():
            extra = {}
            if address is None:  # a local cluster: its workers import what this process imports
                path = os.pathsep.join(p for p in sys.path if p)
                extra["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **extra)
        self.ray = ray
        self.cpus, self.gpus = cpus, gpus
        self.resources, self.max_retries = resources or {}, max_retries

    @property
    def slots(self) -> int:
        cpus = self.ray.cluster_resources().get("CPU", 1.0)
        return max(1, int(cpus // max(self.cpus, 1e-9)))

    def run(self, fn, shared, jobs, needed):
        ray = self.ray
        task = ray.remote(_ray_call).options(
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            resources=self.resources,
            max_retries=self.max_retries,
            retry_exceptions=False,
        )
        shared_ref = ray.put(shared)
        threads = max(1, int(self.cpus))
        refs: dict[str, Any] = {}
        for job in _ordered(jobs, needed):
            dep = refs[job.after] if job.after in refs else needed.get(job.after)
            refs[job.key] = task.remote(fn, shared_ref, job.payload, dep, threads)
        by_ref = {refs[job.key]: job for job in jobs}
        waiting = list(by_ref)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            job = by_ref[ready[0]]
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                yield Outcome(job, error=_error(cause))
                continue
            except ray.exceptions.RayError as e:  # worker lost more often than max_retries
                yield Outcome(job, error=_error(e))
                continue
            yield Outcome(job, result)
