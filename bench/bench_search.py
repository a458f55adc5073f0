"""Time the ILP search on synthetic tables of growing size.

Run with the package importable (installed, or ``PYTHONPATH=src``):

    python bench/bench_search.py
    python bench/bench_search.py --sizes 100x20,400x40 --repeats 5 --params-budget

Each table mimics a real candidate pool: cheaper candidates tend to score worse, so the latency
budget (placed ``--budget-frac`` of the way from the fastest student to the unconstrained best
one) actually binds. The reported time is the median of ``--repeats`` calls to ``solve()``.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from rich.console import Console
from rich.table import Table

import archnet.search as search


def synthetic_table(n_blocks: int, n_cands: int, seed: int) -> search.SearchTable:
    """Blocks of ``n_cands`` candidates; score falls with latency plus noise, like KL vs speed."""
    rng = np.random.default_rng(seed)
    score, lat, params, macs = [], [], [], []
    for _ in range(n_blocks):
        lat_b = rng.uniform(0.02, 0.5, size=n_cands)
        params_b = rng.integers(10_000, 2_000_000, size=n_cands).astype(float)
        score.append(np.maximum(0.0, 0.5 - lat_b + rng.normal(0.0, 0.1, size=n_cands)))
        lat.append(lat_b)
        params.append(params_b)
        macs.append(params_b * rng.uniform(50, 500))
    return search.SearchTable(
        blocks=[f"block{b}" for b in range(n_blocks)],
        candidates=[[f"op{c}" for c in range(n_cands)] for _ in range(n_blocks)],
        score=score,
        costs={"latency_ms": lat, "params": params, "macs": macs},
        offsets={"latency_ms": 0.5, "params": 1e6, "macs": 1e8},
    )


def budgets_for(table: search.SearchTable, frac: float, with_params: bool) -> dict[str, float]:
    """Budgets ``frac`` of the way from each cost's minimum to the unconstrained optimum's total."""
    free = search.solve(table)
    names = ["latency_ms", "params"] if with_params else ["latency_ms"]
    out = {}
    for name in names:
        lo = search.minimum(table, name)
        out[name] = lo + frac * (free.totals[name] - lo)
    return out


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        blocks, cands = part.lower().split("x")
        sizes.append((int(blocks), int(cands)))
    return sizes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10x10,50x20,100x20,200x30", help="BLOCKSxCANDIDATES,...")
    ap.add_argument("--repeats", type=int, default=3, help="solves per size; the median is shown")
    ap.add_argument("--budget-frac", type=float, default=0.5, help="0 = fastest, 1 = unconstrained")
    ap.add_argument("--params-budget", action="store_true", help="add a second (params) budget")
    ap.add_argument("--time-limit", type=float, default=60.0, help="solver time limit in seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows = Table(title="archnet.search.solve on synthetic tables")
    for col in ("blocks", "candidates", "log10 space", "budgets", "solve s (median)", "status"):
        rows.add_column(col, justify="right" if col != "status" else "left")
    console = Console()
    for n_blocks, n_cands in parse_sizes(args.sizes):
        table = synthetic_table(n_blocks, n_cands, args.seed)
        budgets = budgets_for(table, args.budget_frac, args.params_budget)
        times, statuses = [], set()
        for _ in range(args.repeats):
            r = search.solve(table, budgets, time_limit_s=args.time_limit)
            times.append(r.solve_time_s)
            statuses.add(r.status)
        rows.add_row(
            str(n_blocks),
            str(n_cands),
            f"{table.space_size_log10():.1f}",
            str(len(budgets)),
            f"{statistics.median(times):.3f}",
            ",".join(sorted(statuses)),
        )
    console.print(rows)


if __name__ == "__main__":
    main()
