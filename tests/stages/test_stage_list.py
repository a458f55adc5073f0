"""The stage list: which stage each option feeds, and what a resumed run must redo."""

from __future__ import annotations

import dataclasses

import pytest

from archnet import ConvertConfig
from archnet.stages import NAMES, RESULT_FREE, STAGES, config_changes, first_stage, later


def test_the_stages_run_in_one_explicit_order():
    assert NAMES[0] == "prepare" and NAMES[-1] == "report"
    # the budget check needs only the measured costs: no training comes before it
    assert NAMES.index("latency") < NAMES.index("features") < NAMES.index("distill")
    assert later("search") == NAMES[NAMES.index("search") :]


@pytest.mark.parametrize(
    ("key", "stage"),
    [
        ("seed", "prepare"),
        ("data", "prepare"),
        ("max_selection", "prepare"),
        ("target", "candidates"),
        ("bits", "candidates"),
        ("latency.repeats", "latency"),
        ("blockwise.epochs", "distill"),
        ("blockwise.max_samples", "features"),
        ("budget", "search"),
        ("size_budget", "search"),
        ("finetune.lr", "assemble"),
        ("arch.decay", "assemble"),
        ("ablation_seeds", "ablation"),
        ("blockwise.workers", None),
        ("blockwise.amp", "distill"),
        ("device", None),
        ("executor", None),
        ("ray_address", None),
    ],
)
def test_each_option_feeds_its_first_stage(key, stage):
    assert first_stage(key) == stage


def test_every_option_is_claimed_by_a_stage_or_declared_result_free():
    flat = []
    for f in dataclasses.fields(ConvertConfig):
        value = getattr(ConvertConfig(), f.name)
        if dataclasses.is_dataclass(value):
            flat += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            flat.append(f.name)
    unclaimed = [k for k in flat if first_stage(k) is None and k not in RESULT_FREE]
    assert unclaimed == []


def test_config_changes_lists_stored_and_new_values():
    old, new = ConvertConfig(input_size=(3, 32, 32)), ConvertConfig(input_size=None)
    new.budget, new.blockwise.epochs = "0.3", 9
    assert config_changes(old, new) == {"blockwise.epochs": (4, 9), "budget": ("0.5", "0.3")}


def test_every_stage_with_a_result_names_its_file():
    assert all((s.file is None) == (s.result is None) for s in STAGES)
    files = [s.file for s in STAGES if s.file]
    assert len(files) == len(set(files))


@pytest.mark.parametrize("key", ["blockwise.quant_epochs", "blockwise.quant_lr", "first_last"])
def test_quantization_options_re_run_only_quantized_runs(key):
    assert first_stage(key, ConvertConfig(bits=None)) is None
    assert first_stage(key, ConvertConfig(bits="w4a4")) is not None


def test_each_mode_ignores_the_other_modes_schedule():
    hant, archnet = ConvertConfig(target="cpu-ort"), ConvertConfig(target="archnet-5op")
    assert first_stage("arch.global_epochs", hant) is None
    assert first_stage("finetune.epochs", archnet) is None
    assert first_stage("arch.global_epochs", archnet) == first_stage("finetune.epochs", hant)


def test_re_ranking_makes_the_search_read_the_fine_tune_settings():
    hant, archnet = ConvertConfig(target="cpu-ort"), ConvertConfig(target="archnet-5op")
    assert first_stage("finetune.lr", hant) == "assemble"
    assert first_stage("finetune.lr", archnet) is None
    hant.rerank = archnet.rerank = 4
    assert first_stage("finetune.lr", hant) == first_stage("finetune.lr", archnet) == "search"
    # the pass is one epoch whatever the end-to-end stage runs
    assert first_stage("finetune.epochs", hant) == "assemble"
    assert first_stage("finetune.epochs", archnet) is None
    assert first_stage("rerank_samples", hant) == "search"
