"""The search stage: one choice per block by the ILP, and the Pareto sweep around it.

The ILP sums replace-one-block scores, which says nothing of how the swapped blocks interact or
how well the student recovers in the end-to-end stage: two students with equal sums can end a
point of accuracy apart. With ``rerank = K`` the K best students the ILP finds, each half the
blocks or more away from every better one, are assembled and fine-tuned for one short pass,
and the one closest to the teacher on the selection split is chosen; each tried student's figures are saved as soon as they are known,
so a killed stage resumes student by student.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from archnet.choices import parse_choice
from archnet.distill.finetune import finetune
from archnet.results import LatencyTable, PoolResult, ScoreResult, SearchOutcome
from archnet.search import SearchResult, pareto_sweep, plot_pareto, solve_top
from archnet.stages import common
from archnet.stages.distill import all_jobs
from archnet.stages.latency import budgets, cost_table, limits, reference
from archnet.store import RunStore, read_part, write_json

# the fine-tune settings a re-ranking pass reads (it runs one pass, whatever finetune.epochs)
RERANK_FINETUNE = tuple(
    f"finetune.{k}"
    for k in ("batch_size", "lr", "weight_decay", "temperature", "feature_weight", "shift")
)


def rerank_distance(n_blocks: int) -> int:
    """How many blocks apart the students tried must be: half the blocks. Students two swaps
    apart (half the heads for half the heads and MLP, twice) share every block that decides
    how well they recover, and score within 1% of each other after the pass."""
    return max(2, -(-n_blocks // 2))


def run(store: RunStore) -> SearchOutcome:
    latency = store.load("latency.json", LatencyTable)
    scores = store.load("scores.json", ScoreResult).scores
    table = cost_table(store.load("pool.json", PoolResult), latency, scores)
    enforced = limits(store, latency)
    top = solve_top(
        table,
        enforced,
        max(store.config.rerank, 1),
        reference=reference(latency),
        min_distance=rerank_distance(len(table.blocks)),
    )
    tried = rerank(store, top) if len(top) > 1 else []
    result = (
        top[min(range(len(tried)), key=lambda i: tried[i]["kl_recovered"])] if tried else top[0]
    )
    sweep = pareto_sweep(table, "latency_ms", extra_budgets=enforced)
    plot_pareto(
        sweep,
        store.path("pareto.png"),
        reference={"teacher": latency.teacher_predicted_ms},
        chosen=result,
    )
    common.console.print(
        f"  chose {_summary(result)}; predicted {result.totals['latency_ms']:.3f} ms "
        f"(budget {enforced['latency_ms']:.3f} ms with the margin"
        + (f", best of {len(tried)} after a short fine-tune)" if tried else ")")
    )
    return SearchOutcome(
        budgets=budgets(store, latency),
        limits=enforced,
        budget_spec=store.config.budget,
        result=result.to_json(),
        pareto=[r.to_json() for r in sweep],
        table=table.to_json(),
        reranked=tried,
    )


def rerank(store: RunStore, top: list[SearchResult]) -> list[dict]:
    """Each student of ``top`` assembled, then fine-tuned for one pass over the first
    ``rerank_samples`` training images: its selection KL before and after."""
    from archnet.stages.assemble import build_student, selection_kl

    cfg = dataclasses.replace(store.config.finetune, epochs=1)
    task = common.task(store)
    images = task.inputs(store, "train")[: store.config.rerank_samples]
    block_names = [s.name for s in common.specs(store)]
    job_keys = {
        (j.spec.name, j.name): j.key(store.config.blockwise, store.config.seed)
        for j in all_jobs(store, choices_only=True)
    }
    steps = -(-len(images) // cfg.batch_size)
    rows = []
    with common.progress_bar() as bar:
        line = bar.add_task(f"re-ranking the {len(top)} best students", total=len(top) * steps)
        for r in top:
            # a tried student is reused only for the same candidates, data and settings
            blob = [
                [job_keys.get(pair, pair[1]) for pair in zip(block_names, r.names)],
                store.config.target,
                store.config.bits,
                len(images),
                dataclasses.asdict(cfg),
            ]
            key = hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()
            part = store.path(f"rerank/{key[:16]}.json")
            row = read_part(part, key)
            if isinstance(row, dict):
                bar.advance(line, steps)
            else:
                student, _, changed = build_student(store, r.names)
                before = selection_kl(store, student)
                finetune(
                    student,
                    store.teacher,
                    images,
                    cfg,
                    block_names,
                    seed=store.config.seed,
                    on_step=lambda _loss: bar.advance(line),
                    changed=changed,
                    task=task,
                )
                row = {"kl_assembled": before, "kl_recovered": selection_kl(store, student)}
                part.parent.mkdir(exist_ok=True)
                write_json(part, {"key": key, "score": row})
            rows.append(
                {
                    "names": r.names,
                    "objective": r.objective,
                    "predicted_latency_ms": r.totals["latency_ms"],
                    **row,
                }
            )
    return rows


def _summary(result: SearchResult) -> str:
    kept = sum(parse_choice(n)[0] == "teacher" for n in result.names)
    return f"{len(result.names) - kept} of {len(result.names)} blocks replaced"
