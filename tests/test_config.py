"""Budget strings and the TOML round trip of a conversion's settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from archnet.config import Budget, ConvertConfig, LatencyConfig, parse_budget
from archnet.distill.blockwise import BlockwiseConfig
from archnet.distill.finetune import FinetuneConfig
from archnet.errors import ArchnetError

# ------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize(
    ("text", "value", "relative"),
    [
        ("0.5", 0.5, True),
        ("0.5x", 0.5, True),
        (" 0.5 X ", 0.5, True),
        (0.25, 0.25, True),
        ("1.2", 1.2, True),  # a fraction above 1 is still relative for latency
        ("2.5ms", 2.5, False),
        ("2.5 MS", 2.5, False),
        ("1e-1ms", 0.1, False),
    ],
)
def test_latency_budget(text, value: float, relative: bool) -> None:
    budget = parse_budget(text)
    assert isinstance(budget, Budget)
    assert budget.relative is relative
    assert budget.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "-1", "3kg", "0", "0x", "", "ms", "1.5M", "2.5s"])
def test_bad_latency_budget(text: str) -> None:
    with pytest.raises(ArchnetError, match="latency budget"):
        parse_budget(text)


@pytest.mark.parametrize(
    ("text", "value", "relative"),
    [
        ("1.5M", 1.5e6, False),
        ("1.5m", 1.5e6, False),
        ("150k", 1.5e5, False),
        ("2G", 2e9, False),
        ("0.8", 0.8, True),
        ("1", 1.0, True),
        ("1.5x", 1.5, True),
        ("2000000", 2e6, False),  # a plain number above 1 is a count
    ],
)
@pytest.mark.parametrize("what", ["params", "macs"])
def test_count_budget(what: str, text: str, value: float, relative: bool) -> None:
    budget = parse_budget(text, what)
    assert budget.relative is relative
    assert budget.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "-1", "3kg", "2.5ms", "0"])
def test_bad_count_budget(text: str) -> None:
    with pytest.raises(ArchnetError, match="params budget"):
        parse_budget(text, "params")


@pytest.mark.parametrize(
    ("text", "value", "relative"),
    [
        ("0.15", 0.15, True),
        ("0.15x", 0.15, True),
        ("1.5MB", 1.2e7, False),  # bytes, resolved to bits
        ("200kB", 1.6e6, False),
        ("4096b", 32768, False),
    ],
)
def test_size_budget(text: str, value: float, relative: bool) -> None:
    budget = parse_budget(text, "size")
    assert budget.relative is relative
    assert budget.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["tiny", "1.5M", "2ms", "0"])
def test_bad_size_budget(text: str) -> None:
    with pytest.raises(ArchnetError, match="size budget"):
        parse_budget(text, "size")


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"bits": "w1a4"}, "--bits"),
        ({"bits": "auto", "bit_choices": "w8a8,int4"}, "bit_choices"),
        ({"bits": "w4a4", "first_last": "fp16"}, "--first-last"),
        ({"target": "archnet-5op-int"}, "--bits"),
    ],
)
def test_bad_quantization_settings(options: dict, needle: str) -> None:
    cfg = ConvertConfig(**options)
    with pytest.raises(ArchnetError, match=needle):
        cfg.validate()


def test_budget_resolve() -> None:
    assert parse_budget("0.5").resolve(8.0) == pytest.approx(4.0)
    assert parse_budget("2.5ms").resolve(8.0) == pytest.approx(2.5)
    assert parse_budget("1.5M", "params").resolve(1e9) == pytest.approx(1.5e6)
    assert str(parse_budget("0.5")) == "0.5x teacher"


# ------------------------------------------------------------------------ ConvertConfig


def test_config_round_trip(tmp_path: Path) -> None:
    cfg = ConvertConfig(
        model="timm:resnet18",
        checkpoint=None,
        eval_data="some/folder",
        input_size=(3, 64, 48),
        budget="2.5ms",
        params_budget="0.8",
        macs_budget=None,
        blocks="layer*.*",
        candidates="skip,mbconv_*",
        max_samples=None,
        seed=7,
        blockwise=BlockwiseConfig(epochs=2, batch_size=32, lr=1e-3, max_samples=500, workers=3),
        finetune=FinetuneConfig(epochs=1, temperature=4.0, feature_weight=0.0, shift=0),
        latency=LatencyConfig(warmup=3, repeats=9, batch_size=None, rounds=2),
    )
    path = tmp_path / "config.toml"
    cfg.save(path)

    raw = tomllib.loads(path.read_text())
    assert "checkpoint" not in raw and "macs_budget" not in raw  # None is left out
    assert "batch_size" not in raw["latency"]
    assert raw["blockwise"]["max_samples"] == 500
    assert raw["input_size"] == [3, 64, 48]

    back = ConvertConfig.load(path)
    assert back == cfg
    assert back.input_size == (3, 64, 48) and isinstance(back.input_size, tuple)
    assert isinstance(back.blockwise, BlockwiseConfig)
    assert back.blockwise.max_samples == 500 and back.blockwise.workers == 3
    assert back.finetune.temperature == 4.0 and back.finetune.shift == 0
    assert back.checkpoint is None and back.latency.batch_size is None


def test_default_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "default.toml"
    ConvertConfig().save(path)
    assert ConvertConfig.load(path) == ConvertConfig()


def test_partial_config_keeps_defaults() -> None:
    cfg = ConvertConfig.from_dict({"budget": "0.3", "blockwise": {"epochs": 1}})
    assert cfg.budget == "0.3"
    assert cfg.blockwise.epochs == 1
    assert cfg.blockwise.lr == BlockwiseConfig().lr
    assert cfg.finetune == FinetuneConfig()


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('model = "zoo:tiny_resnet"\nbugdet = "0.5"\n')
    with pytest.raises(ArchnetError, match="bugdet") as info:
        ConvertConfig.load(path)
    assert str(path) in str(info.value)
    assert "budget" in str(info.value)  # the known keys are listed


def test_unknown_nested_key_is_named() -> None:
    with pytest.raises(ArchnetError, match="epochz") as info:
        ConvertConfig.from_dict({"blockwise": {"epochz": 3}})
    assert "blockwise" in str(info.value)


def test_section_must_be_a_table() -> None:
    with pytest.raises(ArchnetError, match="finetune must be a table"):
        ConvertConfig.from_dict({"finetune": 3})


def test_missing_and_invalid_config_files(tmp_path: Path) -> None:
    with pytest.raises(ArchnetError, match="does not exist"):
        ConvertConfig.load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = = 0.5\n")
    with pytest.raises(ArchnetError, match="not valid TOML"):
        ConvertConfig.load(bad)
