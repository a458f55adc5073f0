"""``archnet status --run DIR``: where a run stands, read from its files without touching
them (a run in progress keeps writing; this only reads)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from archnet.errors import ArchnetError
from archnet.jobboard import JOBS_FILE, duration
from archnet.store import CONFIG, LOCK, STATE, CorruptResult, read_json

__all__ = ["run_status"]


def _held(root: Path) -> bool:
    """Whether an archnet process holds the run's lock (is working on it now)."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _read(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (CorruptResult, FileNotFoundError):
        return None


def run_status(root: str | Path) -> str:
    """Stages done, and the jobs of the stage that last ran them: done / running / failed /
    waiting with an ETA."""
    root = Path(root)
    if (root / CONFIG).is_file():
        from archnet.stages import NAMES

        done = set((_read(root / STATE) or {}).get("done", {}))
        if (root / "prepare.json").is_file():  # written when the run is created
            done.add("prepare")
        resume = f"archnet convert --resume --out {root}"
    elif (root / "config.json").is_file():  # a translation run: one record per stage
        from archnet.seq2seq.config import STAGE_ORDER as NAMES

        done = {n for n in NAMES if (root / "stages" / f"{n}.json").is_file()}
        resume = f"archnet convert --task translation --resume --out {root}"
    else:
        raise ArchnetError(f"{root} is not an archnet run (no {CONFIG}); give --run a run dir")
    working = _held(root)
    lines = [f"run {root}: {'in progress' if working else 'not running'}"]
    marks = [f"{n} {'done' if n in done else '-'}" for n in NAMES]
    lines.append("stages: " + ", ".join(marks))
    board = _read(root / JOBS_FILE)
    if board:
        running = board["running"] if working else 0
        eta = board.get("eta_s") if working else None
        age = time.time() - board.get("updated", time.time())
        lines.append(
            f"jobs ({board['stage']}, {board['executor']}): {board['done']} done, "
            f"{running} running, {board['failed']} failed, {board['left'] - running} left, "
            f"of {board['total']}"
            + (f", ETA {duration(eta)}" if eta is not None else "")
            + f" (updated {duration(age)} ago)"
        )
        lines += [f"  failed: {e}" for e in board.get("errors", [])[:5]]
    if not working and len(done) < len(NAMES):
        lines.append(f"continue with: {resume}")
    return "\n".join(lines)
