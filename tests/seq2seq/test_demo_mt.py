"""`archnet demo-mt` end to end: the teacher trained on the Bible's training books, Arch-Net
(float, W4A4, then W2A4 added by a resumed run) and HANT at 0.6 of the teacher's latency,
held to the issue's figures."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_demo_mt_figures(tmp_path):
    from archnet.cli import main
    from archnet.seq2seq.demo import run_demo_mt
    from archnet.store import read_json

    rows = {row["conversion"]: row["report"] for row in run_demo_mt(tmp_path)}
    hant = rows["hant"]
    resume = ["convert", "--task", "translation", "--resume", "--bits", "w4a4,w2a4"]
    assert main([*resume, "--out", str(tmp_path / "mt-archnet")]) == 0
    archnet = read_json(tmp_path / "mt-archnet" / "report.json")
    teacher = archnet["scores"]["teacher"]["bleu"]
    assert teacher >= 10
    drops = {k: v["bleu_drop"] for k, v in archnet["scores"].items() if k != "teacher"}
    assert drops["fp32"] <= 1.0 and drops["w4a4"] <= 1.5 and drops["w2a4"] <= 3.0, drops
    for label in ("fp32", "w4a4", "w2a4"):
        model = archnet["export"]["models"][label]
        assert model["violations"] == 0 and not model["removed_ops_left"]
        # float graphs decode exactly; a QDQ rounding tie may fork a few greedy paths
        assert model["tokens_match"] if label == "fp32" else model["tokens_match_share"] >= 95
    assert hant["scores"]["fp32"]["bleu_drop"] <= 1.0
    assert hant["export"]["models"]["fp32"]["tokens_match"]
    kept = [t for t in hant["search"]["calibration"] if t.get("kept")]
    assert kept[0]["within_budget"]
    # measured again at export, on test sentences: within the budget up to timing noise
    assert hant["export"]["models"]["fp32"]["latency_ratio"] <= 0.6 * 1.1


@pytest.mark.slow
def test_demo_mt_fast_path(tmp_path):
    from archnet.seq2seq.demo import run_demo_mt

    rows = run_demo_mt(tmp_path, fast=True)
    assert {row["conversion"] for row in rows} == {"archnet", "hant"}
