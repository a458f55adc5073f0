"""Pick one candidate per block with an integer linear program under cost budgets.

Every block of the teacher has a pool of candidate operations. Each candidate has a score (lower is
better, e.g. the KL divergence of the teacher when that block is swapped in) and one or more
additive costs (latency, params, MACs, size in bits). Choosing one candidate per block so that the
summed score is minimal while every summed cost stays under its budget is a multiple-choice
knapsack problem; it is solved exactly with HiGHS through :func:`scipy.optimize.milp`.

Candidates whose score or any cost is not finite (for example an operation that cannot run on the
target, recorded as ``inf``) are never chosen.

Ties are broken deterministically. Among candidates of one block with equal score, the one with the
lower normalised cost wins (each cost divided by its largest possible total, summed over costs),
then the lower index. The solver sees this as a tiny extra objective term (1e-7 of the largest
score) that steers it towards cheaper students; because that is below HiGHS's optimality
tolerance, a final one-block-swap pass enforces the rule exactly. Exact ties between different
multi-block combinations (rare with real-valued scores) are settled by the solver, which returns
the same answer for the same table. :func:`brute_force` applies the full lexicographic rule
(summed score, summed normalised cost, candidate indices).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from archnet.errors import ArchnetError

__all__ = [
    "InfeasibleBudget",
    "SearchResult",
    "SearchTable",
    "brute_force",
    "minimum",
    "pareto_sweep",
    "plot_pareto",
    "solve",
    "solve_top",
]

# Weight of the tie-break term relative to the largest score. The whole term sums to at most this
# fraction of the largest score, below the solver's own optimality tolerance, so it cannot make a
# noticeably worse student win.
_TIE_WEIGHT = 1e-7
# HiGHS optimality gap; the default (1e-4) would leave visibly suboptimal choices.
_HIGHS_OPTIONS: dict[str, Any] = {"mip_rel_gap": 1e-9}
# Slack when comparing summed costs with budgets, relative to the budget.
_BUDGET_RTOL = 1e-9
# Largest search space brute_force() agrees to enumerate.
_BRUTE_FORCE_LIMIT = 2_000_000


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class SearchTable:
    """Scores and costs of every candidate of every block: the whole input of the search.

    ``score[b][c]`` and ``costs[name][b][c]`` describe candidate ``c`` of block ``b``; pools may
    have different sizes per block. ``offsets[name]`` is a constant added to the summed cost (parts
    of the network that are not searched, such as the stem and head latency), so budgets and totals
    are always for the whole network.
    """

    blocks: list[str]
    candidates: list[list[str]]
    score: list[np.ndarray]
    costs: dict[str, list[np.ndarray]]
    offsets: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept plain lists (e.g. from JSON) and store float arrays, so the solver never sees
        # ragged or integer data; shape errors surface here rather than deep inside the solver.
        self.blocks = [str(b) for b in self.blocks]
        self.candidates = [[str(c) for c in pool] for pool in self.candidates]
        n = len(self.blocks)
        if len(self.candidates) != n or len(self.score) != n:
            raise ArchnetError(
                f"search table is inconsistent: {n} blocks, {len(self.candidates)} candidate "
                f"lists and {len(self.score)} score lists; they must have the same length"
            )
        self.score = [_as_vector(s, "score", blk, len(p)) for s, blk, p in self._rows(self.score)]
        fixed: dict[str, list[np.ndarray]] = {}
        for name, per_block in self.costs.items():
            if len(per_block) != n:
                raise ArchnetError(
                    f"search table is inconsistent: cost {name!r} has {len(per_block)} block "
                    f"entries but there are {n} blocks"
                )
            fixed[str(name)] = [
                _as_vector(v, name, blk, len(p)) for v, blk, p in self._rows(per_block)
            ]
        self.costs = fixed
        unknown = sorted(set(self.offsets) - set(self.costs))
        if unknown:
            raise ArchnetError(
                f"search table has offsets for unknown costs {unknown}; "
                f"known costs: {sorted(self.costs)}"
            )
        self.offsets = {str(k): float(v) for k, v in self.offsets.items()}

    def _rows(self, values: Sequence[Any]) -> Iterable[tuple[Any, str, list[str]]]:
        return zip(values, self.blocks, self.candidates, strict=True)

    def to_json(self) -> dict:
        """Plain-JSON form (lists and floats; non-finite values become ``null``) for search.json."""
        return {
            "blocks": list(self.blocks),
            "candidates": [list(p) for p in self.candidates],
            "score": [_json_floats(s) for s in self.score],
            "costs": {k: [_json_floats(v) for v in per] for k, per in self.costs.items()},
            "offsets": dict(self.offsets),
        }

    @classmethod
    def from_json(cls, d: dict) -> SearchTable:
        """Inverse of :meth:`to_json`; ``null`` reads back as ``inf`` (candidate not available)."""
        try:
            return cls(
                blocks=list(d["blocks"]),
                candidates=[list(p) for p in d["candidates"]],
                score=[_from_json_floats(s) for s in d["score"]],
                costs={k: [_from_json_floats(v) for v in per] for k, per in d["costs"].items()},
                offsets=dict(d.get("offsets", {})),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ArchnetError(f"search table JSON is malformed ({type(e).__name__}: {e})") from e

    def total(self, cost: str, choice: Sequence[int]) -> float:
        """Whole-network cost of a choice: offset plus the chosen candidate's cost in every block."""
        _check_cost(self, cost)
        if len(choice) != len(self.blocks):
            raise ArchnetError(
                f"choice has {len(choice)} entries but there are {len(self.blocks)} blocks"
            )
        per = self.costs[cost]
        return float(
            self.offsets.get(cost, 0.0) + sum(float(per[b][c]) for b, c in enumerate(choice))
        )

    def space_size_log10(self) -> float:
        """log10 of the number of possible students (product of pool sizes); -inf if a pool is empty."""
        sizes = [len(p) for p in self.candidates]
        if any(s == 0 for s in sizes):
            return float("-inf")
        return float(sum(math.log10(s) for s in sizes))

    def objective(self, choice: Sequence[int]) -> float:
        """Summed score of a choice (what the search minimises)."""
        return float(sum(float(self.score[b][c]) for b, c in enumerate(choice)))


@dataclass
class SearchResult:
    """One chosen student: the candidate per block, its summed score and every cost total."""

    choice: list[int]
    names: list[str]
    objective: float
    totals: dict[str, float]
    budgets: dict[str, float]
    status: str
    solve_time_s: float

    def to_json(self) -> dict:
        """Plain-JSON form, for reports and for reloading a chosen student."""
        return {
            "choice": [int(c) for c in self.choice],
            "names": list(self.names),
            "objective": float(self.objective),
            "totals": {k: float(v) for k, v in self.totals.items()},
            "budgets": {k: float(v) for k, v in self.budgets.items()},
            "status": self.status,
            "solve_time_s": float(self.solve_time_s),
        }

    @classmethod
    def from_json(cls, d: dict) -> SearchResult:
        """Inverse of :meth:`to_json`."""
        return cls(
            choice=[int(c) for c in d["choice"]],
            names=list(d["names"]),
            objective=float(d["objective"]),
            totals={k: float(v) for k, v in d["totals"].items()},
            budgets={k: float(v) for k, v in d.get("budgets", {}).items()},
            status=str(d.get("status", "optimal")),
            solve_time_s=float(d.get("solve_time_s", 0.0)),
        )


class InfeasibleBudget(ArchnetError):
    """No student meets the budget(s); the message says how far the budget must be raised.

    ``cost``, ``budget`` and ``minimum`` name the offending cost, the requested budget and the
    smallest achievable total. When several budgets are only jointly infeasible, ``cost`` lists
    them joined by ``+`` and ``budget`` / ``minimum`` are dicts per cost (each minimum taken alone).
    """

    def __init__(
        self,
        cost: str,
        budget: float | dict[str, float],
        minimum: float | dict[str, float],
        message: str,
    ) -> None:
        super().__init__(message)
        self.cost = cost
        self.budget = budget
        self.minimum = minimum


# --------------------------------------------------------------------------------------------------
# search


def minimum(table: SearchTable, cost: str) -> float:
    """Smallest achievable total of one cost: offset plus the cheapest available candidate per block.

    Used to reject an impossible budget with a precise message before running the solver.
    """
    _check_solvable(table)
    _check_cost(table, cost)
    ok = _available(table)
    per = table.costs[cost]
    return float(
        table.offsets.get(cost, 0.0) + sum(float(per[b][ok[b]].min()) for b in range(len(per)))
    )


def solve(
    table: SearchTable,
    budgets: dict[str, float] | None = None,
    time_limit_s: float = 60.0,
    *,
    reference: dict[str, float] | None = None,
    exclude: Sequence[Sequence[int]] = (),
    min_distance: int = 1,
) -> SearchResult:
    """Best student (lowest summed score) whose cost totals are all within ``budgets``.

    ``budgets`` maps cost names to whole-network limits (offsets included); ``None`` values are
    ignored. ``reference`` (e.g. the teacher's totals) only improves the error message when a budget
    is infeasible. ``exclude`` lists choices to stay away from: the result differs from each in at
    least ``min_distance`` blocks (one no-good cut each), which is how :func:`solve_top` finds
    the next best. The result's status is ``"optimal"``, or ``"time_limit"`` when the solver
    stopped early with a feasible but possibly suboptimal student.
    """
    t0 = time.perf_counter()
    _check_solvable(table)
    budgets = _check_budgets(table, budgets, reference)
    ok = _available(table)
    sizes = [len(s) for s in table.score]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_var = int(starts[-1])

    score_scale, tie = _tie_terms(table, ok)
    score = np.concatenate(table.score)
    c = np.where(np.isfinite(score), score, 0.0) / score_scale + _TIE_WEIGHT * np.concatenate(tie)
    upper = np.concatenate(ok).astype(float)  # unavailable candidates are fixed to 0

    # One row per block: exactly one candidate chosen.
    rows = np.repeat(np.arange(len(sizes)), sizes)
    one_hot = csr_array((np.ones(n_var), (rows, np.arange(n_var))), shape=(len(sizes), n_var))
    constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
    # One row per budget on the available candidates' costs (offset moved to the right-hand side).
    for name, budget in budgets.items():
        coef = np.concatenate(table.costs[name])
        coef = np.where(np.concatenate(ok), coef, 0.0)
        rhs = budget - table.offsets.get(name, 0.0) + _slack(budget)
        # Rows scaled to unit size: params (1e6) and latency (1e-1) then have equal numerics.
        scale = float(np.abs(coef).max()) or 1.0
        constraints.append(LinearConstraint(coef[None, :] / scale, -np.inf, rhs / scale))
    for other in exclude:  # at most n - min_distance of its picks
        picks = np.zeros(n_var)
        picks[starts[:-1] + np.asarray(other, dtype=np.int64)] = 1.0
        constraints.append(LinearConstraint(picks[None, :], -np.inf, len(sizes) - min_distance))

    with _quiet_stdout():
        res = milp(
            c,
            integrality=np.ones(n_var),
            bounds=Bounds(np.zeros(n_var), upper),
            constraints=constraints,
            options={**_HIGHS_OPTIONS, "time_limit": float(time_limit_s), "disp": False},
        )
    if res.x is None:
        if res.status == 2:
            raise _joint_infeasible(table, budgets, reference)
        if res.status == 1:
            raise ArchnetError(
                f"the search found no feasible student within the time limit of {time_limit_s:g} s; "
                "raise the time limit or relax the budgets"
            )
        raise ArchnetError(f"the search solver failed: {res.message}")

    x = np.asarray(res.x)
    choice = [int(np.argmax(np.round(x[starts[b] : starts[b + 1]]))) for b in range(len(sizes))]
    choice = _polish(table, choice, budgets, ok, tie, exclude, min_distance)
    status = "optimal" if res.status == 0 else "time_limit" if res.status == 1 else "feasible"
    return _result(table, choice, budgets, status, time.perf_counter() - t0)


def solve_top(
    table: SearchTable,
    budgets: dict[str, float] | None,
    k: int,
    time_limit_s: float = 60.0,
    *,
    reference: dict[str, float] | None = None,
    min_distance: int = 1,
) -> list[SearchResult]:
    """The ``k`` best students within ``budgets``, best first, each differing from every earlier
    one in at least ``min_distance`` blocks (fewer when the space holds fewer): the ILP solved
    again with each earlier answer cut off."""
    out: list[SearchResult] = []
    for _ in range(max(k, 1)):
        try:
            out.append(
                solve(
                    table,
                    budgets,
                    time_limit_s,
                    reference=reference,
                    exclude=[r.choice for r in out],
                    min_distance=min_distance,
                )
            )
        except ArchnetError:  # infeasible: every student left is too close or too costly
            if not out:
                raise
            break
    return out


def brute_force(table: SearchTable, budgets: dict[str, float] | None) -> SearchResult:
    """Exhaustive search with the same tie-breaking as :func:`solve`; a reference for small tables."""
    t0 = time.perf_counter()
    _check_solvable(table)
    budgets = _check_budgets(table, budgets, None)
    ok = _available(table)
    space = math.prod(int(o.sum()) for o in ok)
    if space > _BRUTE_FORCE_LIMIT:
        raise ArchnetError(
            f"brute force would enumerate {space} students (limit {_BRUTE_FORCE_LIMIT}); use solve()"
        )
    _, tie = _tie_terms(table, ok)
    pools = [np.flatnonzero(o).tolist() for o in ok]
    best: tuple[float, float, tuple[int, ...]] | None = None
    for choice in itertools.product(*pools):
        if not _within(table, list(choice), budgets):
            continue
        key = (
            float(sum(float(table.score[b][c]) for b, c in enumerate(choice))),
            float(sum(float(tie[b][c]) for b, c in enumerate(choice))),
            choice,
        )
        if best is None or key < best:
            best = key
    if best is None:
        raise _joint_infeasible(table, budgets, None)
    return _result(table, list(best[2]), budgets, "optimal", time.perf_counter() - t0)


def pareto_sweep(
    table: SearchTable,
    cost: str = "latency_ms",
    n: int = 12,
    extra_budgets: dict[str, float] | None = None,
    time_limit_s: float = 60.0,
) -> list[SearchResult]:
    """Optimal students for ``n`` budgets of one cost, to show the score/cost trade-off.

    Budgets are spaced evenly from the cheapest possible total to the total of the best student
    without that budget (beyond it nothing improves). ``extra_budgets`` apply to every point.
    Infeasible points are skipped and a student found at several budgets is kept once, at the
    tightest budget that produced it. Results are ordered by increasing budget.
    """
    _check_solvable(table)
    _check_cost(table, cost)
    if n < 1:
        raise ArchnetError(f"pareto sweep needs at least one point, got n={n}")
    extra = {k: v for k, v in (extra_budgets or {}).items() if k != cost}
    lo = minimum(table, cost)
    try:
        free = solve(table, extra, time_limit_s)
    except InfeasibleBudget:
        return []
    hi = max(free.totals[cost], lo)
    points = [hi] if n == 1 or hi <= lo else np.linspace(lo, hi, n).tolist()
    out: list[SearchResult] = []
    seen: set[tuple[int, ...]] = set()
    for budget in points:
        try:
            r = solve(table, {**extra, cost: float(budget)}, time_limit_s)
        except InfeasibleBudget:
            continue
        key = tuple(r.choice)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def plot_pareto(
    results: Sequence[SearchResult],
    path: str | Path,
    cost: str = "latency_ms",
    reference: dict[str, float] | None = None,
    chosen: SearchResult | None = None,
) -> Path:
    """Write a PNG of summed score against cost total, so the budget choice can be judged by eye.

    ``reference`` (e.g. the teacher's totals) draws a vertical line at its ``cost``; ``chosen`` is
    highlighted. Uses the Agg canvas directly so it works without a display and leaves the global
    matplotlib backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [r for r in results if cost in r.totals]
    if not pts and chosen is None:
        raise ArchnetError(f"nothing to plot: no search result has a {cost!r} total")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    label, _, unit = _cost_words(cost)
    k = 1 / (8 * 2**20) if unit == "MiB" else 1.0  # sizes in bits are shown in MiB
    pts = sorted(pts, key=lambda r: r.totals[cost])
    if pts:
        ax.plot(
            [r.totals[cost] * k for r in pts],
            [r.objective for r in pts],
            "o-",
            color="tab:blue",
            label="optimal students",
        )
    if chosen is not None and cost in chosen.totals:
        ax.plot(
            [chosen.totals[cost] * k],
            [chosen.objective],
            marker="*",
            markersize=16,
            color="tab:red",
            linestyle="none",
            label="chosen",
            zorder=5,
        )
    if reference and cost in reference:
        ax.axvline(reference[cost] * k, color="gray", linestyle="--", label="teacher")
    ax.set_xlabel(f"{label} ({unit})" if unit else label)
    ax.set_ylabel("summed score (lower is better)")
    ax.set_title(f"score vs {label}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence output written straight to file descriptor 1 while the solver runs.

    Some HiGHS builds print a stray debug line from C++ even with logging off, which would land in
    the middle of the command-line output. If descriptor 1 cannot be duplicated nothing changes.
    """
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _as_vector(values: Any, what: str, block: str, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ArchnetError(
            f"search table is inconsistent: block {block!r} has {n} candidates but {arr.shape[0]} "
            f"{what} values"
        )
    return arr


def _json_floats(arr: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(arr, dtype=float).tolist()]


def _from_json_floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.inf if v is None else float(v) for v in values], dtype=np.float64)


def _check_cost(table: SearchTable, cost: str) -> None:
    if cost not in table.costs:
        raise ArchnetError(f"unknown cost {cost!r}; known costs: {sorted(table.costs)}")


def _check_solvable(table: SearchTable) -> None:
    if not table.blocks:
        raise ArchnetError("search table is empty: there are no blocks to choose candidates for")
    for blk, pool in zip(table.blocks, table.candidates, strict=True):
        if not pool:
            raise ArchnetError(f"block {blk!r} has no candidates; every block needs at least one")


def _available(table: SearchTable) -> list[np.ndarray]:
    """Per block, a mask of candidates with finite score and costs; every block must keep one."""
    ok = [np.isfinite(np.asarray(s, dtype=float)) for s in table.score]
    for per in table.costs.values():
        ok = [o & np.isfinite(np.asarray(v, dtype=float)) for o, v in zip(ok, per, strict=True)]
    for blk, o in zip(table.blocks, ok, strict=True):
        if not o.any():
            raise ArchnetError(
                f"block {blk!r} has no usable candidate: every one has a non-finite score or cost"
            )
    return ok


def _tie_terms(table: SearchTable, ok: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """Score normaliser and per-candidate normalised cost used to break ties towards cheaper."""
    finite = [np.abs(s[o]) for s, o in zip(table.score, ok, strict=True)]
    score_scale = float(max(f.max() for f in finite)) or 1.0
    tie = [np.zeros(len(s)) for s in table.score]
    n_costs = max(len(table.costs), 1)
    for per in table.costs.values():
        vals = [np.where(o, v, 0.0) for v, o in zip(per, ok, strict=True)]
        scale = float(sum(np.abs(v).max() for v in vals)) or 1.0
        tie = [t + v / (scale * n_costs) for t, v in zip(tie, vals, strict=True)]
    return score_scale, tie


def _slack(budget: float) -> float:
    return _BUDGET_RTOL * max(1.0, abs(budget))


def _check_budgets(
    table: SearchTable, budgets: dict[str, float] | None, reference: dict[str, float] | None
) -> dict[str, float]:
    """Drop ``None`` budgets, reject unknown costs, and reject any budget below its own minimum."""
    out: dict[str, float] = {}
    for name, value in (budgets or {}).items():
        if value is None:
            continue
        _check_cost(table, name)
        value = float(value)
        if math.isnan(value):
            raise ArchnetError(f"the {name} budget is not a number")
        out[name] = value
    for name, value in out.items():
        lo = minimum(table, name)
        if lo > value + _slack(value):
            raise InfeasibleBudget(name, value, lo, _infeasible_message(name, value, lo, reference))
    return out


def _within(table: SearchTable, choice: list[int], budgets: dict[str, float]) -> bool:
    return all(table.total(k, choice) <= v + _slack(v) for k, v in budgets.items())


def _polish(
    table: SearchTable,
    choice: list[int],
    budgets: dict[str, float],
    ok: list[np.ndarray],
    tie: list[np.ndarray],
    exclude: Sequence[Sequence[int]] = (),
    min_distance: int = 1,
) -> list[int]:
    """Apply single-block swaps that lower (score, tie-break, index), keep every budget and stay
    ``min_distance`` blocks away from every ``exclude``d choice.

    This makes tie-breaking exact where the solver's optimality tolerance left it open, and removes
    any small suboptimality left by a time limit. Each swap strictly lowers the lexicographic
    (summed score, summed tie-break, summed index) key, so the loop ends.
    """
    choice = list(choice)
    totals = {k: table.total(k, choice) for k in budgets}
    limit = {k: v + _slack(v) for k, v in budgets.items()}
    changed = True
    while changed:
        changed = False
        for b in range(len(choice)):
            cur = choice[b]
            best = cur
            for c in np.flatnonzero(ok[b]).tolist():
                if c == cur:
                    continue
                key = (float(table.score[b][c]), float(tie[b][c]), c)
                best_key = (float(table.score[b][best]), float(tie[b][best]), best)
                if key >= best_key:
                    continue
                fits = all(
                    totals[k] - table.costs[k][b][cur] + table.costs[k][b][c] <= limit[k]
                    for k in budgets
                )
                if fits and _far(choice[:b] + [c] + choice[b + 1 :], exclude, min_distance):
                    best = c
            if best != cur:
                for k in budgets:
                    totals[k] += float(table.costs[k][b][best] - table.costs[k][b][cur])
                choice[b] = best
                changed = True
    return choice


def _far(choice: list[int], exclude: Sequence[Sequence[int]], min_distance: int) -> bool:
    return all(sum(a != b for a, b in zip(choice, e)) >= min_distance for e in exclude)


def _result(
    table: SearchTable, choice: list[int], budgets: dict[str, float], status: str, seconds: float
) -> SearchResult:
    return SearchResult(
        choice=[int(c) for c in choice],
        names=[table.candidates[b][c] for b, c in enumerate(choice)],
        objective=table.objective(choice),
        totals={k: table.total(k, choice) for k in table.costs},
        budgets=dict(budgets),
        status=status,
        solve_time_s=float(seconds),
    )


def _cost_words(cost: str) -> tuple[str, str, str]:
    """(label, who-is-cheapest phrase, unit) for messages and plot axes."""
    if cost == "latency_ms":
        return "latency", "fastest student", "ms"
    if cost == "params":
        return "params", "smallest student", "params"
    if cost == "macs":
        return "MACs", "cheapest student", "MACs"
    if cost.endswith("bits"):
        return "model size", "smallest student", "MiB"
    return cost, "cheapest student", ""


def _fmt(cost: str, value: float) -> str:
    _, _, unit = _cost_words(cost)
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "MiB":
        return f"{value / 8 / 2**20:.2f} MiB"
    mag = abs(value)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if mag >= div:
            text = f"{value / div:.2f}{suffix}"
            break
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}" if unit else text


def _infeasible_message(
    cost: str, budget: float, lo: float, reference: dict[str, float] | None
) -> str:
    label, who, _ = _cost_words(cost)
    msg = f"{label} budget {_fmt(cost, budget)} is infeasible: the {who} is {_fmt(cost, lo)}"
    ref = (reference or {}).get(cost)
    if ref is not None and ref > 0:
        # Round the fraction up so that the suggested budget really is feasible.
        frac = math.ceil(lo / ref * 100 - 1e-9) / 100
        hint = "--budget" if cost == "latency_ms" else f"the {label} budget"
        return f"{msg} (raise {hint} to at least {frac:.2f} of the teacher)"
    return f"{msg} (raise the {label} budget to at least {_fmt(cost, lo)})"


def _joint_infeasible(
    table: SearchTable, budgets: dict[str, float], reference: dict[str, float] | None
) -> InfeasibleBudget:
    names = list(budgets)
    lows = {k: minimum(table, k) for k in names}
    parts = ", ".join(f"{_cost_words(k)[0]} {_fmt(k, budgets[k])}" for k in names)
    alone = ", ".join(f"{_cost_words(k)[0]} {_fmt(k, lows[k])}" for k in names)
    if len(names) == 1:
        # Only reachable when the pre-check's tolerance and the solver disagree at the boundary.
        k = names[0]
        return InfeasibleBudget(
            k, budgets[k], lows[k], _infeasible_message(k, budgets[k], lows[k], reference)
        )
    msg = (
        f"budgets {parts} are jointly infeasible: each is reachable on its own (minimums: {alone}) "
        "but no student meets all of them at once; relax at least one of them"
    )
    return InfeasibleBudget("+".join(names), dict(budgets), lows, msg)
