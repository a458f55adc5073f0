"""The whole translation path on the toy teacher: `archnet convert --task translation` (Arch-Net
float + W4A4, and HANT at a latency budget), resume, `archnet translate`, and bad input."""

from __future__ import annotations

import json

import pytest

from archnet.cli import main

TINY = """
max_new = 24
qat_steps = 8
hant_steps = 8
hant_finetune_steps = 8
latency_repeats = 2
[distill]
stage_steps = 2
final_steps = 16
batch_tokens = 512
warmup = 2
"""


@pytest.fixture(scope="module")
def archnet_run(toy_mt, tmp_path_factory):
    folder, tsv = toy_mt
    root = tmp_path_factory.mktemp("mt")
    (root / "tiny.toml").write_text(TINY)
    out = root / "run"
    args = ["convert", "--task", "translation", "--model", f"hf:{folder}", "--data", str(tsv)]
    args += [
        "--target",
        "archnet-transformer",
        "--bits",
        "w4a4",
        "--config",
        str(root / "tiny.toml"),
    ]
    assert main([*args, "--out", str(out)]) == 0
    return out, args


def test_archnet_student_has_only_target_operators(archnet_run):
    out, _ = archnet_run
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "archnet" and set(rep["scores"]) == {"teacher", "fp32", "w4a4"}
    models = rep["export"]["models"]
    assert models["teacher"]["violations"] > 0  # the check can fail: the teacher fails it
    for label in ("fp32", "w4a4"):
        assert models[label]["violations"] == 0 and models[label]["removed_ops_left"] == []
        assert models[label]["tokens_match"]  # onnxruntime decodes PyTorch's tokens
        assert models[label]["translation_ms"] > 0
    assert "QuantizeLinear" in models["w4a4"]["ops"]
    assert rep["scores"]["teacher"]["bleu"] > 30  # the toy teacher translates
    for name in ("report.md", "bleu.png", "training.png", "translations.tsv"):
        assert (out / name).is_file()
    assert (out / "onnx" / "fp32" / "decoder_step.onnx").is_file()


def test_resume_reruns_only_what_a_changed_option_touches(archnet_run, capsys):
    out, args = archnet_run
    assert main([*args[:-4], "--out", str(out), "--resume"]) == 0  # nothing changed
    text = capsys.readouterr().out
    assert "student: done earlier, kept" in text and "quantize: done earlier, kept" in text
    assert (
        main(["convert", "--task", "translation", "--out", str(out), "--resume", "--bits", "w2a4"])
        == 0
    )
    text = capsys.readouterr().out
    assert "student: done earlier, kept" in text
    assert "quantize: settings changed since it ran" in text
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["scores"]) == {"teacher", "fp32", "w2a4"}


def test_resume_reads_a_config_file(archnet_run, tmp_path, capsys):
    """A --config given with --resume changes the stored settings: never ignored silently."""
    out, _ = archnet_run
    (tmp_path / "timing.toml").write_text("latency_repeats = 3\n")
    resume = ["convert", "--task", "translation", "--out", str(out), "--resume"]
    assert main([*resume, "--config", str(tmp_path / "timing.toml")]) == 0
    text = capsys.readouterr().out
    assert "student: done earlier, kept" in text
    assert "export: settings changed since it ran" in text
    assert json.loads((out / "config.json").read_text())["latency_repeats"] == 3
    (tmp_path / "typo.toml").write_text("latency_repeat = 2\n")
    assert main([*resume, "--config", str(tmp_path / "typo.toml")]) == 2
    assert "unknown setting latency_repeat" in capsys.readouterr().err


def test_resume_refuses_other_data(archnet_run, toy_mt, tmp_path, capsys):
    out, _ = archnet_run
    other = tmp_path / "other.tsv"
    other.write_text(toy_mt[1].read_text()[:2000])
    code = main(
        ["convert", "--task", "translation", "--out", str(out), "--resume", "--data", str(other)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "data" in err and len(err.strip().splitlines()) == 1


def test_translate_command(archnet_run, capsys):
    out, _ = archnet_run
    assert main(["translate", "--run", str(out), "The man sees the city today.", "The king"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(lines)  # one translation per sentence
    assert main(["translate", "--run", str(out), "--model", "w9a9", "x"]) == 2


def test_hant_times_its_choices_against_the_budget(toy_mt, tmp_path):
    folder, tsv = toy_mt
    (tmp_path / "tiny.toml").write_text(TINY)
    args = ["convert", "--task", "translation", "--model", f"hf:{folder}", "--data", str(tsv)]
    args += ["--target", "cpu-ort", "--budget", "0.6", "--config", str(tmp_path / "tiny.toml")]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    search = rep["search"]
    tried = search["calibration"]
    kept = [t for t in tried if t.get("kept")]
    assert len(kept) == 1 and kept[0]["choice"] == search["choice"]
    assert all(t["measured_ratio"] > 0 for t in tried)
    if any(t["within_budget"] for t in tried):
        assert kept[0]["measured_ratio"] <= 0.6
    else:  # the toy's layers are too small to time below its per-call costs
        assert kept[0]["measured_ratio"] == min(t["measured_ratio"] for t in tried)
    assert search["choice"] != ["keep"] * len(search["choice"])
    assert rep["export"]["models"]["fp32"]["tokens_match"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model", "hf:/nonexistent"], "save_pretrained"),
        (["--data", "nope.bin"], "translation data"),
        (["--bits", "w9a4"], "--bits"),
        (["--target", "no-such-target"], "target"),
    ],
)
def test_bad_input_is_one_line_exit_2(toy_mt, tmp_path, capsys, extra, words):
    folder, tsv = toy_mt
    args = ["convert", "--task", "translation", "--model", f"hf:{folder}", "--data", str(tsv)]
    args += ["--out", str(tmp_path / "run"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
