"""The run directory: paths, the lock, which stages are done, and verified reading of its files.

Everything a conversion produces lives in one directory so a killed run resumes and a stage can
be re-run alone. Every file is checked when it is read: a stage result that cannot be read is
recomputed (the stage runs again), an input that cannot be (the teacher, the data) is an error
that names the file and the way out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from archnet.config import ConvertConfig
from archnet.errors import ArchnetError
from archnet.results import CorruptResult, PrepareResult, Result

R = TypeVar("R", bound=Result)

STATE = "state.json"
CONFIG = "config.toml"
LOCK = ".lock"


class RunLocked(ArchnetError):
    """Another process works on this run directory."""


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: Path) -> Any:
    """Parsed JSON, or CorruptResult saying why not (missing, unreadable, not JSON)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptResult("missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptResult(f"not valid JSON ({type(e).__name__})") from None


def read_part(path: Path, key: str) -> Any:
    """The value a resumable step saved at ``path`` as ``{"key": key, "score": value}``; None
    when it is missing, unreadable, or was saved under another key (other settings)."""
    try:
        part = read_json(path)
    except ValueError:
        return None
    if not isinstance(part, dict) or part.get("key") != key or "score" not in part:
        return None
    return part["score"]


def prepare_directory(root: Path) -> None:
    """Create ``root`` or fail in one line: it is a file, or it cannot be written."""
    if root.exists() and not root.is_dir():
        raise ArchnetError(f"--out {root} is a file; pass a directory path for the run")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = "read-only file system" if e.errno == errno.EROFS else e.strerror or str(e)
        raise ArchnetError(
            f"cannot write to run directory {root} ({reason}); pass --out on a writable disk"
        ) from None


class RunStore:
    """One run directory and its configuration."""

    def __init__(self, root: str | Path, config: ConvertConfig) -> None:
        self.root = Path(root)
        self.config = config
        self._lock_fd: int | None = None

    # --- paths and the lock ------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunStore]:
        """Hold the run exclusively: a second process on the same directory is refused."""
        if self._lock_fd is not None:  # re-entrant within one process
            yield self
            return
        fd = os.open(self.path(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(
                f"run directory {self.root} is in use by another archnet process (pid {holder}); "
                "wait for it to finish, or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        try:
            yield self
        finally:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # --- state -------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        """``{"done": {stage: {"seconds": s}}}``; an unreadable file counts as nothing done."""
        try:
            state = read_json(self.path(STATE))
            if isinstance(state, dict) and isinstance(state.get("done"), dict):
                return state
        except CorruptResult:
            pass
        return {"done": {}}

    def state_is_readable(self) -> bool:
        try:
            state = read_json(self.path(STATE))
        except CorruptResult:
            return False
        return isinstance(state, dict) and isinstance(state.get("done"), dict)

    def done(self) -> dict[str, Any]:
        return self.state["done"]

    def mark_done(self, name: str, seconds: float) -> None:
        state = self.state
        state["done"][name] = {"seconds": round(seconds, 2)}
        write_json(self.path(STATE), state)

    def forget(self, names: list[str]) -> None:
        """Mark stages as not done (their files stay until the stage writes new ones)."""
        state = self.state
        state["done"] = {k: v for k, v in state["done"].items() if k not in names}
        write_json(self.path(STATE), state)

    def save_config(self) -> None:
        self.config.save(self.path(CONFIG))

    # --- results -----------------------------------------------------------------------------
    def save(self, file: str, result: Result) -> None:
        write_json(self.path(file), result.to_json())

    def load(self, file: str, kind: type[R]) -> R:
        """A stage's result; ArchnetError naming the file when it cannot be read."""
        try:
            return self.try_load(file, kind)
        except CorruptResult as e:
            raise ArchnetError(
                f"{self.path(file)} is unreadable ({e}); run `archnet convert --resume --out "
                f"{self.root}` to recompute it"
            ) from None

    def try_load(self, file: str, kind: type[R]) -> R:
        try:
            return kind.from_json(read_json(self.path(file)))
        except TypeError as e:  # a field of the wrong shape
            raise CorruptResult(str(e)) from None

    # --- inputs ------------------------------------------------------------------------------
    @cached_property
    def prepared(self) -> PrepareResult:
        try:
            return self.try_load("prepare.json", PrepareResult)
        except CorruptResult as e:
            raise ArchnetError(
                f"{self.path('prepare.json')} is unreadable ({e}); the run cannot continue "
                "without it: start a new run with --out NEW_DIR"
            ) from None

    @cached_property
    def teacher(self) -> nn.Module:
        return _load_torch(self.path("teacher.pt"), "the teacher", weights_only=False).eval()

    @cached_property
    def data(self) -> dict[str, torch.Tensor]:
        data = _load_torch(self.path("data.pt"), "the data splits", weights_only=True)
        if not isinstance(data, dict) or "train_images" not in data:
            raise ArchnetError(
                f"{self.path('data.pt')} does not hold the run's data splits; start a new run "
                "with --out NEW_DIR"
            )
        return data

    def images(self, split: str) -> torch.Tensor:
        return self.data[f"{split}_images"].float()

    def labels(self, split: str) -> torch.Tensor | None:
        return self.data.get(f"{split}_labels")


def missing_module(path: Path, what: str, e: ModuleNotFoundError) -> ArchnetError:
    """The one line for a pickled model whose class's module cannot be imported here."""
    return ArchnetError(
        f"{path} ({what}) needs the module {e.name!r}, which cannot be imported here; run "
        "archnet where that module is importable (e.g. add its folder to PYTHONPATH)"
    )


def _load_torch(path: Path, what: str, weights_only: bool) -> Any:
    """An input of the run that cannot be recomputed: its loss ends the run with a clear line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        problem = "is missing"
    except ModuleNotFoundError as e:  # a pickled model whose class lives in the user's code
        raise missing_module(path, what, e) from None
    except Exception as e:  # truncated or foreign files raise many types
        problem = f"is unreadable ({type(e).__name__})"
    raise ArchnetError(
        f"{path} ({what}) {problem}; the run cannot continue without it: start a new run with "
        "--out NEW_DIR"
    )


def open_store(root: str | Path) -> RunStore:
    """An existing run directory, with its stored configuration."""
    root = Path(root)
    if not (root / CONFIG).is_file() or not (root / "prepare.json").exists():
        raise ArchnetError(
            f"{root} is not an archnet run directory (no {CONFIG} / prepare.json); pass the "
            "--out of an earlier `archnet convert`"
        )
    try:
        config = ConvertConfig.load(root / CONFIG)
    except ArchnetError as e:
        raise ArchnetError(
            f"{e}; restore {root / CONFIG} or start a new run with --out NEW_DIR"
        ) from None
    from archnet.plugins import load_plugins

    load_plugins(config.plugins)  # the run's converters, as when it was created
    return RunStore(root, config)
