"""A damaged run directory: each file is recomputed, or named in one line with the way out.

Every case truncates or garbles one file of a finished run, then resumes it from the command
line: the resumed run must finish (the damaged part recomputed) or stop with exit code 2 and
one line naming the file, never a traceback.
"""

from __future__ import annotations

import shutil

import pytest

from archnet.cli import main
from archnet.stages import later
from archnet.store import open_store


def truncate(path):
    path.write_bytes(path.read_bytes()[: max(len(path.read_bytes()) // 3, 1)])


def garble(path):
    path.write_bytes(b"\x00garbage{")


def remove(path):
    path.unlink()


def first(pattern: str):
    return lambda root: sorted(root.glob(pattern))[0]


def garble_with_its_table(path):
    """The cache and the table read from it: the stage must open the damaged cache."""
    garble(path)
    garble(path.with_name("latency.json"))


# (file, damage, recomputed?) — inputs of the run cannot be recomputed: their loss is an error
CASES = [
    ("state.json", garble, True),
    ("pool.json", garble, True),
    ("latency.json", truncate, True),
    ("features/train/000_in.npy", truncate, True),
    ("features/selection/logits.npy", remove, True),
    (first("candidates/*/skip.pt"), truncate, True),
    ("scores.json", garble, True),
    ("search.json", truncate, True),
    ("student.pt", truncate, True),
    ("evaluation.json", garble, True),
    ("student.onnx", remove, True),
    ("report.json", garble, True),
    ("distill.json", garble, True),
    ("features.json", garble, True),
    ("assemble.json", garble, True),
    ("export.json", truncate, True),
    ("ablation.json", garble, True),
    ("teacher.onnx", remove, True),
    ("latency.sqlite", garble_with_its_table, False),
    ("teacher.pt", truncate, False),
    ("data.pt", garble, False),
    ("prepare.json", garble, False),
    ("config.toml", garble, False),
]
FAST = {"state.json", "scores.json", "report.json", "evaluation.json", "teacher.pt", "prepare.json"}


def _cases():
    for file, damage, recomputed in CASES:
        name = file if isinstance(file, str) else "candidates/*/skip.pt"
        marks = [] if name in FAST else [pytest.mark.slow]
        yield pytest.param(file, damage, recomputed, id=f"{name}-{damage.__name__}", marks=marks)


@pytest.mark.parametrize(("file", "damage", "recomputed"), list(_cases()))
def test_damaged_file(finished_run, tmp_path, capsys, file, damage, recomputed):
    root = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, root)
    path = root / file if isinstance(file, str) else file(root)
    if not recomputed and path.suffix == ".pt":
        open_store(root).forget(later("evaluate"))  # a stage that reads the teacher and data
    damage(path)
    code = main(["convert", "--resume", "--out", str(root)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if recomputed:
        assert code == 0, err
        assert "report" in open_store(root).done()
        assert (root / "report.json").stat().st_size > 100
    else:
        assert code == 2, err
        line = [ln for ln in err.splitlines() if ln.startswith("archnet: error:")]
        assert len(line) == 1 and path.name in line[0], err
