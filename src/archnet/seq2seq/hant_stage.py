"""HANT's student stage for a translation run: candidates, their latency on the target, the
replace-one scores, the ILP under the latency budget, and an end-to-end fine-tune.

The budget is a fraction of the teacher's *predicted* translation latency (the sum of its
measured parts, in the same table as every candidate); the export stage then times teacher and
student translations whole, in one run, and the report gives both.
"""

from __future__ import annotations

import time

import torch

from archnet.search import solve
from archnet.seq2seq.data import make_batches
from archnet.seq2seq.distill import tenths
from archnet.seq2seq.hant import (
    LATENCY,
    CandidatePool,
    assemble,
    budget_ms,
    finetune,
    replace_one_scores,
    search_table,
    teacher_choice,
    train_candidates,
)
from archnet.seq2seq.layer_latency import mean_output_tokens, measure_latency
from archnet.seq2seq.net import Seq2SeqNet
from archnet.targets import load_target

__all__ = ["run_hant"]


def _every(log, what: str, total_every: int = 25):
    t0 = time.perf_counter()

    def show(done: int, total: int) -> None:
        if done == total or done % total_every == 0:
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
    scores = replace_one_scores(teacher, pool, selection, progress=_every(log, "scores", 4))
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
        progress=_every(log, "latency", 4),
    )
    table = search_table(teacher, pool, scores, parts, out_tokens)
    budget = budget_ms(table, cfg.budget) if cfg.budget is not None else None
    result = solve(table, {LATENCY: budget} if budget is not None else None)
    log(f"  search: {', '.join(result.names)} ({result.totals[LATENCY]:.2f} ms predicted)")
    student = assemble(teacher, result.names, pool)
    history = finetune(
        student,
        teacher,
        train,
        cfg.hant_finetune_steps,
        lr=3e-4,
        seed=cfg.seed,
        progress=_every(log, "fine-tune", 100),
    )
    search = {
        "blocks": table.blocks,
        "choice": result.names,
        "budget_fraction": cfg.budget,
        "budget_ms": budget,
        "teacher_predicted_ms": table.total(LATENCY, teacher_choice(table)),
        "predicted_ms": result.totals[LATENCY],
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
