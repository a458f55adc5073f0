"""The translation commands: ``convert --task translation``, ``translate`` and ``demo-mt``."""

from __future__ import annotations

import argparse
from pathlib import Path

from archnet.errors import ArchnetError

__all__ = ["add_parsers", "convert", "demo_mt", "translate"]


def _parse_budget(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ArchnetError(
            f"--budget {text!r}: a translation budget is a fraction of the teacher's measured "
            "translation latency, e.g. 0.6"
        ) from None


def convert(a: argparse.Namespace, log=print) -> int:
    """``archnet convert --task translation``: the options that apply to translation."""
    from archnet.config import merge_settings, read_toml
    from archnet.seq2seq.config import TranslationConfig
    from archnet.seq2seq.pipeline import CONFIG, convert_translation
    from archnet.store import read_json

    root = Path(a.out)
    if a.resume and (root / CONFIG).is_file():
        stored = read_json(root / CONFIG)
        if a.config:  # the file's settings replace the stored ones (and the run says what changed)
            stored = merge_settings(stored, read_toml(a.config))
        cfg = TranslationConfig.from_dict(stored, a.config or str(root / CONFIG))
    elif not a.model or not a.data:
        raise ArchnetError(
            "convert --task translation needs --model hf:DIR and --data (bible, a .tsv or "
            "source.txt,target.txt)"
        )
    else:
        cfg = TranslationConfig.load(a.config) if a.config else TranslationConfig()
    given = {
        "model": a.model,
        "data": a.data,
        "eval_data": a.eval_data,
        "target": a.target,
        "bits": a.bits,
        "budget": _parse_budget(a.budget),
        "seed": a.seed,
        "max_train": a.max_samples,
    }
    for key, value in given.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.__post_init__()
    run = convert_translation(cfg, root, resume=a.resume, log=log)
    print((run.path("report.md")).read_text(encoding="utf-8"))
    return 0


def translate(a: argparse.Namespace) -> int:
    """Translate sentences with a finished run's student (or its teacher)."""
    from archnet.seq2seq.config import TranslationConfig
    from archnet.seq2seq.data import encode
    from archnet.seq2seq.evaluate import decode_all, detokenize
    from archnet.seq2seq.pipeline import CONFIG, TranslationRun
    from archnet.store import read_json

    root = Path(a.run)
    if not (root / CONFIG).is_file():
        raise ArchnetError(f"{root} is not a translation run (no {CONFIG}); give --run DIR")
    run = TranslationRun(root, TranslationConfig.from_dict(read_json(root / CONFIG)))
    students = run.students()
    if a.model == "teacher":
        net = run.teacher
    elif a.model in students:
        net = run.load_model(students[a.model])
    else:
        known = ", ".join(["teacher", *students]) or "teacher"
        raise ArchnetError(f"--model {a.model!r} is not in {root}; choose one of: {known}")
    sentences = a.sentences or [
        line for line in __import__("sys").stdin.read().splitlines() if line
    ]
    ids = decode_all(
        net, encode(run.tokenizer, sentences, run.config.max_len), run.config.max_new, a.beams
    )
    for text in detokenize(run.tokenizer, ids):
        print(text)
    return 0


def demo_mt(a: argparse.Namespace) -> int:
    from archnet.seq2seq.demo import run_demo_mt

    run_demo_mt(Path(a.out), fast=a.fast, only=a.only)
    return 0


def add_parsers(sub) -> None:
    t = sub.add_parser("translate", help="translate sentences with a translation run's student")
    t.add_argument("--run", required=True, help="a run directory of convert --task translation")
    t.add_argument("sentences", nargs="*", help="sentences (default: one per line on stdin)")
    t.add_argument(
        "--model", default="fp32", help="'fp32' (the float student), a bit width, or 'teacher'"
    )
    t.add_argument("--beams", type=int, default=1)

    d = sub.add_parser(
        "demo-mt",
        help="train a small English->German Marian teacher on the Bible here, convert it "
        "(Arch-Net float and W4A4; HANT at 0.6 of its latency), print BLEU",
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--fast", action="store_true", help="a tiny schedule (smoke tests)")
    d.add_argument("--only", help="'archnet' or 'hant'")
