"""The run store: atomic JSON, verified reads, the lock."""

from __future__ import annotations

import pytest

from archnet.config import ConvertConfig
from archnet.errors import ArchnetError
from archnet.results import CorruptResult, FeaturesResult, PrepareResult
from archnet.store import RunLocked, RunStore, read_json, write_json


def test_json_round_trip_and_damage(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": (1, 2)})
    assert read_json(path) == {"a": [1, 2]}
    assert not list(tmp_path.glob("*.tmp"))
    path.write_text('{"a": ')
    with pytest.raises(CorruptResult, match="not valid JSON"):
        read_json(path)
    with pytest.raises(CorruptResult, match="missing"):
        read_json(tmp_path / "none.json")


def test_a_result_missing_a_field_is_corrupt_not_defaulted():
    with pytest.raises(CorruptResult, match="fingerprint"):
        PrepareResult.from_json(
            {
                "blocks": [],
                "splits": {},
                "eval_source": "",
                "labelled_eval": False,
                "input_size": [],
            }
        )
    assert FeaturesResult.from_json({"splits": {"train": 3}, "extra": 1}).splits == {"train": 3}


def test_the_lock_is_exclusive_between_stores_and_reentrant_within_one(tmp_path):
    a, b = RunStore(tmp_path, ConvertConfig()), RunStore(tmp_path, ConvertConfig())
    with a.locked():
        with a.locked():  # the same store may take it again
            pass
        with pytest.raises(RunLocked, match="pid"), b.locked():
            pass
    with b.locked():  # released
        pass


def test_an_unreadable_state_counts_as_nothing_done(tmp_path):
    store = RunStore(tmp_path, ConvertConfig())
    store.mark_done("latency", 1.0)
    assert "latency" in store.done()
    (tmp_path / "state.json").write_text("[1, 2")
    assert store.done() == {} and not store.state_is_readable()


def test_a_teacher_pickled_from_code_that_is_gone(tmp_path, monkeypatch):
    import sys

    import torch

    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\nclass Mine(nn.Module):\n    def forward(self, x):\n        return x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import mymodels

    torch.save(mymodels.Mine(), tmp_path / "teacher.pt")
    monkeypatch.delitem(sys.modules, "mymodels")
    (tmp_path / "mymodels.py").unlink()
    store = RunStore(tmp_path, ConvertConfig())
    with pytest.raises(ArchnetError, match="needs the module 'mymodels'.*PYTHONPATH"):
        _ = store.teacher


def test_a_pickled_model_whose_module_is_gone_names_it(tmp_path, monkeypatch):
    """A teacher (or student) of the user's own class, read where its module is not
    importable: one line naming the module, not a traceback."""
    import importlib
    import sys

    import torch

    from archnet.stages.assemble import STUDENT, load_student
    from archnet.store import _load_torch

    (tmp_path / "user_models.py").write_text(
        "import torch\nclass Wrapped(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.conv = torch.nn.Conv1d(1, 2, 5)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("user_models")
    torch.save(module.Wrapped(), tmp_path / "teacher.pt")
    torch.save(module.Wrapped(), tmp_path / STUDENT)
    monkeypatch.delitem(sys.modules, "user_models")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(ArchnetError, match="needs the module 'user_models'.*PYTHONPATH"):
        _load_torch(tmp_path / "teacher.pt", "the teacher", weights_only=False)

    class Store:
        def path(self, name):
            return tmp_path / name

    with pytest.raises(ArchnetError, match="needs the module 'user_models'"):
        load_student(Store())
