"""``archnet demo-mt``: a small English->German Marian teacher trained here on the Bible's
training books, converted two ways, scored on the test books that no choice read.

Arch-Net on ``archnet-transformer`` (no LayerNorm, GELU/SiLU or embedding gathers) in float and
at W4A4, and HANT on onnxruntime CPU at 0.6 of the teacher's translation latency. Each
conversion leaves its own run directory and report; ``archnet convert --task translation
--resume --out runs/demo/mt-archnet --bits w4a4,w2a4`` adds the W2A4 student to it.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from archnet.errors import ArchnetError
from archnet.seq2seq.config import TranslationConfig
from archnet.seq2seq.distill import Seq2SeqDistillConfig
from archnet.seq2seq.pipeline import convert_translation
from archnet.store import read_json
from archnet.zoo.demo_mt import mt_teacher_cached
from archnet.zoo.tiny_mt import MTRecipe

__all__ = ["CONVERSIONS", "demo_configs", "run_demo_mt"]

CONVERSIONS = ("archnet", "hant")


def demo_configs(teacher: Path, fast: bool = False) -> dict[str, TranslationConfig]:
    """The demo's two conversions; ``fast`` proves the path on a few hundred sentences."""
    model = f"hf:{teacher}"
    small = {"max_train": 300, "max_selection": 40, "max_test": 60, "qat_steps": 20, "max_new": 48}
    archnet = TranslationConfig(
        model=model,
        target="archnet-transformer",
        bits="w4a4",
        distill=Seq2SeqDistillConfig(stage_steps=5, final_steps=20)
        if fast
        else Seq2SeqDistillConfig(),
    )
    hant = TranslationConfig(model=model, target="cpu-ort", budget=0.6)
    if fast:
        for cfg in (archnet, hant):
            for k, v in small.items():
                setattr(cfg, k, v)
        hant.hant_steps, hant.hant_finetune_steps = 10, 20
    return {"archnet": archnet, "hant": hant}


def _fast_recipe() -> MTRecipe:
    return MTRecipe(vocab_size=600, d_model=32, ffn=64, heads=2, layers=(2, 2), steps=60, warmup=10)


def run_demo_mt(out: Path, fast: bool = False, only: str | None = None, log=print) -> list[dict]:
    """Train (or reuse) the teacher, run the conversions, print one table; returns its rows."""
    if only is not None and only not in CONVERSIONS:
        raise ArchnetError(f"--only {only!r}: choose one of {', '.join(CONVERSIONS)}")
    t0 = time.perf_counter()
    teacher, record = mt_teacher_cached(out, _fast_recipe() if fast else None, log=log)
    log(f"teacher: {record['seconds'] / 60:.1f} min of training ({teacher})")
    rows = []
    for name, cfg in demo_configs(teacher, fast).items():
        if only is not None and name != only:
            continue
        folder = out / f"mt-{name}{'-fast' if fast else ''}"
        log(f"== {name}: {cfg.target} -> {folder}")
        run = convert_translation(cfg, folder, resume=True, log=log)
        rep = read_json(run.path("report.json"))
        rows.append({"conversion": name, "report": rep, "run": str(folder)})
    log(f"demo-mt: {(time.perf_counter() - t0) / 60:.1f} min (teacher cached)")
    Console().print(demo_table(rows))
    return rows


def demo_table(rows: list[dict]) -> Table:
    """One row per model of each conversion; each conversion times its own teacher again,
    beside its students, in one process."""
    table = Table(title="demo-mt: English -> German, test books (greedy decoding)")
    cols = ("conversion", "model", "BLEU", "chrF", "drop", "violations", "translation ms")
    for col in cols:
        table.add_column(col)
    for row in rows:
        rep = row["report"]
        models = rep["export"].get("models", {})
        for label, s in rep["scores"].items():
            m = models.get(label, {})
            ms = f"{m['translation_ms']:.1f}" if "translation_ms" in m else ""
            if "speedup" in m:
                ms += f" ({m['speedup']:.2f}x)"
            table.add_row(
                f"{row['conversion']} ({rep['target']})" if label == "teacher" else "",
                label,
                f"{s['bleu']:.2f}",
                f"{s['chrf']:.2f}",
                f"{s['bleu_drop']:.2f}" if "bleu_drop" in s else "",
                str(m.get("violations", "")),
                ms,
            )
    return table
