"""Progress of a stage's jobs, on disk: what ``archnet status`` reads while a run works.

The driver alone writes ``jobs.json`` (atomically, after every change), so a second process
can watch a run without touching it. The ETA is the mean time of the jobs finished in this
run times the jobs left, over the jobs that run at once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from archnet.store import write_json

__all__ = ["JOBS_FILE", "JobBoard", "duration"]

JOBS_FILE = "jobs.json"


@dataclass
class JobBoard:
    """Counts of one stage's jobs; :meth:`save` after each change."""

    path: Path
    stage: str
    total: int
    done: int = 0  # including those done before this run
    failed: int = 0
    slots: int = 1  # jobs at once
    executor: str = "inprocess"
    started: float = field(default_factory=time.time)
    finished: int = 0  # jobs finished in this run
    errors: list[str] = field(default_factory=list)

    @property
    def left(self) -> int:
        return self.total - self.done - self.failed

    @property
    def running(self) -> int:
        return min(self.slots, self.left)

    @property
    def eta_s(self) -> float | None:
        if not self.finished:
            return None
        return (time.time() - self.started) / self.finished * self.left

    def finish(self) -> None:
        self.done += 1
        self.finished += 1
        self.save()

    def fail(self, label: str, error: str) -> None:
        self.failed += 1
        self.errors.append(f"{label}: {error}")
        self.save()

    def summary(self) -> str:
        eta = "" if self.eta_s is None else f", ETA {duration(self.eta_s)}"
        return (
            f"{self.done} done, {self.running} running, {self.failed} failed, "
            f"{self.left - self.running} waiting, of {self.total}{eta}"
        )

    def save(self) -> None:
        record = asdict(self)
        record.pop("path")
        record |= {
            "left": self.left,
            "running": self.running,
            "eta_s": self.eta_s,
            "updated": time.time(),
        }
        write_json(self.path, record)


def duration(seconds: float) -> str:
    """``1h02m`` or ``3m05s``."""
    minutes, s = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{s:02d}s"
