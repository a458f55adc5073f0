"""BLEU and chrF of the teacher and every student on the test split, which no choice read.

Each model translates the test sources with the same decoding (greedy, or beam search with
``--beams``); sacrebleu scores the detokenized text against the references, and its signature
goes into the report so the figures can be reproduced. How often a student's translation is
word for word the teacher's is reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from archnet.seq2seq.data import by_length
from archnet.seq2seq.decode import beam_search, greedy
from archnet.seq2seq.net import Seq2SeqNet
from archnet.tasks import get_task

__all__ = ["decode_all", "evaluate_models", "detokenize"]


def decode_all(
    net: Seq2SeqNet, src: list[list[int]], max_new: int, beams: int = 1, batch_size: int = 64
) -> list[list[int]]:
    """Output ids of every source, in input order (batches of similar length)."""
    if beams > 1:
        return by_length(src, lambda b: beam_search(net, b, beams, max_new), net.pad, batch_size)
    return by_length(src, lambda b: greedy(net, b, max_new), net.pad, batch_size)


def detokenize(tokenizer, ids: list[list[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def evaluate_models(run, log: Callable[[str], None]) -> dict:
    """Scores of the teacher and each student of ``run``; writes ``translations.tsv``."""
    cfg, task = run.config, get_task("translation")
    test = run.data()["test"]
    models = {"teacher": run.teacher}
    models |= {label: run.load_model(file) for label, file in run.students().items()}
    texts: dict[str, list[str]] = {}
    scores: dict[str, dict] = {}
    for label, net in models.items():
        t0 = time.perf_counter()
        ids = decode_all(net, test["src"], cfg.max_new, cfg.beams)
        texts[label] = detokenize(run.tokenizer, ids)
        scores[label] = task.metrics(texts[label], test["refs"])
        scores[label]["decode_seconds"] = time.perf_counter() - t0
        if label != "teacher":
            same = task.agreement(texts[label], texts["teacher"])["same_text"]
            scores[label]["same_as_teacher"] = same
            scores[label]["bleu_drop"] = scores["teacher"]["bleu"] - scores[label]["bleu"]
        log(
            f"  {label}: BLEU {scores[label]['bleu']:.2f}  chrF {scores[label]['chrf']:.2f}  "
            f"({scores[label]['decode_seconds']:.0f} s, {len(ids)} sentences)"
        )
    header = "\t".join(["source", "reference", *texts])
    rows = zip(test["sources"], test["refs"], *texts.values())
    lines = [header] + ["\t".join(cell.replace("\t", " ") for cell in row) for row in rows]
    run.path("translations.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {
        "scores": scores,
        "sentences": len(test["src"]),
        "decoding": f"beam {cfg.beams}" if cfg.beams > 1 else "greedy",
    }
