"""HANT's student stage for a translation run: candidates, their latency on the target, the
replace-one scores, the ILP under the latency budget, and an end-to-end fine-tune.

The budget is a fraction of the teacher's *measured* translation latency. The ILP sees
predictions (sums of measured parts), which leave out what only a whole translation pays (the
host's work per step, the cache moved in and out of every step); so each choice the ILP makes
is assembled, exported and timed against the teacher, translating a batch of selection
sentences as long as the teacher's translations of them, in interleaved rounds. The measured
ratio corrects the next solve's predicted budget (:func:`calibrated_solve`); the best choice
measured within the budget is kept. The export stage times the fine-tuned student again, on
test sentences, decoding greedily.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from archnet.errors import ArchnetError
from archnet.search import SearchResult, SearchTable, solve
from archnet.seq2seq.data import make_batches
from archnet.seq2seq.decode import pad_batch
from archnet.seq2seq.distill import tenths
from archnet.seq2seq.hant import (
    LATENCY,
    CandidatePool,
    assemble,
    finetune,
    replace_one_scores,
    search_table,
    teacher_choice,
    train_candidates,
)
from archnet.seq2seq.layer_latency import mean_output_tokens, measure_latency
from archnet.seq2seq.net import Seq2SeqNet
from archnet.seq2seq.onnx import export_seq2seq
from archnet.seq2seq.timing import latency_sample, time_translations
from archnet.targets import load_target

__all__ = ["calibrated_solve", "run_hant"]


def _every(log, what: str, lines: int = 10):
    """A progress callback that logs about ``lines`` lines, with the time so far."""
    t0 = time.perf_counter()

    def show(done: int, total: int) -> None:
        if done == total or done % max(1, total // lines) == 0:
            log(f"  {what}: {done}/{total}  {time.perf_counter() - t0:.0f} s")

    return show


def run_hant(run, log) -> tuple[Seq2SeqNet, dict]:
    """(fine-tuned student, record) of HANT on ``run``'s teacher and data."""
    cfg = run.config
    teacher = run.teacher
    train = make_batches(run.pairs("train"), teacher, cfg.distill.batch_tokens, cfg.seed)
    selection = make_batches(run.pairs("selection"), teacher, cfg.distill.batch_tokens, cfg.seed)

    pool_file = run.path("candidates.pt")
    # the candidates depend on the data and their own schedule, not on the budget or fine-tune
    key = f"{cfg.key('prepare')}:{cfg.hant_steps}:{cfg.distill.batch_tokens}"
    saved = torch.load(pool_file, weights_only=False) if pool_file.is_file() else {}
    if saved.get("key") == key:
        pool = CandidatePool.from_state(teacher, saved["pool"])
        log("  candidates: trained earlier with these settings, kept")
    else:
        pool = train_candidates(
            teacher,
            train,
            steps=cfg.hant_steps,
            seed=cfg.seed,
            progress=_every(log, "blockwise training"),
        )
        torch.save({"key": key, "pool": pool.state_dict()}, pool_file)
    scores = replace_one_scores(teacher, pool, selection, progress=_every(log, "scores"))
    real = sum(int(b.src.ne(teacher.pad).sum()) for b in selection)
    src_len = max(1, round(real / sum(len(b.src) for b in selection)))  # mean source length
    out_tokens = mean_output_tokens(selection)
    target = load_target(cfg.target)
    parts = measure_latency(
        teacher,
        pool,
        backend=target.latency_backend(),
        src_len=src_len,
        cache_len=cfg.max_new,
        batch=cfg.latency_batch,  # as the export stage times whole translations
        progress=_every(log, "latency"),
    )
    table = search_table(teacher, pool, scores, parts, out_tokens)
    selection_pairs = run.pairs("selection")
    sample = latency_sample(selection_pairs.src, cfg.latency_batch)
    src = pad_batch([selection_pairs.src[i] for i in sample], teacher.pad)
    steps = max(len(selection_pairs.out[i]) for i in sample)  # the teacher's translation

    if cfg.budget is None:
        result, tried = solve(table), []
    else:
        with tempfile.TemporaryDirectory() as tmp:  # the teacher exported once, timed each try
            teacher_onnx = export_seq2seq(teacher, tmp, cfg.max_new, src_len=src.shape[1])

            def measure(names: Sequence[str]) -> float:
                timed = time_translations(
                    {"teacher": teacher_onnx, "student": assemble(teacher, names, pool)},
                    src,
                    max_new=steps,
                    rounds=cfg.latency_repeats,
                    max_len=cfg.max_new,
                    fixed=True,
                )
                return timed["student"].ratio

            result, tried = calibrated_solve(table, cfg.budget, measure, log)
    log(f"  search: {', '.join(result.names)} ({result.totals[LATENCY]:.2f} ms predicted)")
    student = assemble(teacher, result.names, pool)
    history = finetune(
        student,
        teacher,
        train,
        cfg.hant_finetune_steps,
        lr=3e-4,
        seed=cfg.seed,
        progress=_every(log, "fine-tune"),
    )
    search = {
        "blocks": table.blocks,
        "choice": result.names,
        "budget_fraction": cfg.budget,
        "teacher_predicted_ms": table.total(LATENCY, teacher_choice(table)),
        "predicted_ms": result.totals[LATENCY],
        "calibration": tried,
        "calibration_batch": [len(sample), steps],
        "src_len": src_len,
        "mean_output_tokens": out_tokens,
        "batch": cfg.latency_batch,
        "status": result.status,
        "scores": scores,
        "latency_parts": parts.to_json(),
        "blockwise_start": pool.start_loss,
        "blockwise_final": pool.final_loss,
    }
    return student, {"search": search, "history": {"finetune_loss": tenths(history)}}


def calibrated_solve(
    table: SearchTable,
    fraction: float,
    measure: Callable[[Sequence[str]], float],
    log: Callable[[str], None],
    rounds: int = 4,
) -> tuple[SearchResult, list[dict]]:
    """(best-scoring choice whose *measured* latency ratio to the teacher is within
    ``fraction``, every choice tried). ``measure(names)`` times a choice against the teacher.

    The first solve's budget is ``fraction`` of the teacher's predicted latency; after each,
    the next budget is the choice's predicted ratio scaled by ``fraction / measured``, which
    tightens a budget the prediction undershot and loosens one it overshot, until a choice
    repeats or ``rounds`` solves. When none is measured within ``fraction`` the fastest one
    measured is kept, and its record says so (``within_budget``)."""
    teacher_ms = table.total(LATENCY, teacher_choice(table))
    scale, tried, results = fraction, [], []
    for _ in range(rounds):
        try:
            result = solve(table, {LATENCY: scale * teacher_ms})
        except ArchnetError:  # a corrected budget below the fastest choice
            break
        predicted = result.totals[LATENCY] / teacher_ms
        if result.names in [t["choice"] for t in tried]:
            break
        measured = measure(result.names)
        tried.append(
            {
                "budget_predicted": scale,
                "choice": result.names,
                "predicted_ratio": predicted,
                "measured_ratio": measured,
                "score": result.objective,
                "within_budget": measured <= fraction,
            }
        )
        results.append(result)
        log(
            f"  budget {scale:.3f} of the predicted teacher: {', '.join(result.names)}, "
            f"predicted {predicted:.3f}, measured {measured:.3f} of the teacher's time"
        )
        scale = predicted * fraction / measured
    if not results:
        raise ArchnetError(
            f"--budget {fraction}: no student fits even the predicted budget; raise --budget"
        )
    within = [i for i, t in enumerate(tried) if t["within_budget"]]
    if within:
        best = min(within, key=lambda i: tried[i]["score"])
    else:
        best = min(range(len(tried)), key=lambda i: tried[i]["measured_ratio"])
        log(f"  no choice measured within --budget {fraction}; keeping the fastest one measured")
    tried[best]["kept"] = True
    return results[best], tried
