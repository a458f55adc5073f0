"""The search stage: one choice per block by the ILP, and the Pareto sweep around it."""

from __future__ import annotations

from archnet.choices import parse_choice
from archnet.results import LatencyTable, PoolResult, ScoreResult, SearchOutcome
from archnet.search import SearchResult, pareto_sweep, plot_pareto, solve
from archnet.stages import common
from archnet.stages.latency import budgets, cost_table, limits, reference
from archnet.store import RunStore


def run(store: RunStore) -> SearchOutcome:
    latency = store.load("latency.json", LatencyTable)
    scores = store.load("scores.json", ScoreResult).scores
    table = cost_table(store.load("pool.json", PoolResult), latency, scores)
    enforced = limits(store, latency)
    result = solve(table, enforced, reference=reference(latency))
    sweep = pareto_sweep(table, "latency_ms", extra_budgets=enforced)
    plot_pareto(
        sweep,
        store.path("pareto.png"),
        reference={"teacher": latency.teacher_predicted_ms},
        chosen=result,
    )
    common.console.print(
        f"  chose {_summary(result)}; predicted {result.totals['latency_ms']:.3f} ms "
        f"(budget {enforced['latency_ms']:.3f} ms with the margin, solved in "
        f"{result.solve_time_s:.2f} s)"
    )
    return SearchOutcome(
        budgets=budgets(store, latency),
        limits=enforced,
        budget_spec=store.config.budget,
        result=result.to_json(),
        pareto=[r.to_json() for r in sweep],
        table=table.to_json(),
    )


def _summary(result: SearchResult) -> str:
    kept = sum(parse_choice(n)[0] == "teacher" for n in result.names)
    return f"{len(result.names) - kept} of {len(result.names)} blocks replaced"
