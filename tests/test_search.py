"""The ILP search must match exhaustive search, explain infeasible budgets and round-trip to JSON."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from archnet.errors import ArchnetError
from archnet.search import (
    InfeasibleBudget,
    SearchResult,
    SearchTable,
    brute_force,
    minimum,
    pareto_sweep,
    plot_pareto,
    solve,
    solve_top,
)


def random_table(
    rng: np.random.Generator,
    n_blocks: int,
    max_cands: int,
    min_cands: int = 2,
    offsets: bool = True,
) -> SearchTable:
    """Cheap candidates score worse, like real candidate pools, so budgets actually bind."""
    sizes = rng.integers(min_cands, max_cands + 1, size=n_blocks)
    score, lat, params = [], [], []
    for n in sizes:
        lat_b = rng.uniform(0.05, 1.0, size=n)
        params_b = rng.integers(1_000, 100_000, size=n).astype(float)
        score.append(np.maximum(0.0, 1.0 - lat_b + rng.normal(0, 0.2, size=n)))
        lat.append(lat_b)
        params.append(params_b)
    return SearchTable(
        blocks=[f"block{b}" for b in range(n_blocks)],
        candidates=[[f"b{b}c{c}" for c in range(n)] for b, n in enumerate(sizes)],
        score=score,
        costs={"latency_ms": lat, "params": params},
        offsets={"latency_ms": 0.3, "params": 5_000.0} if offsets else {},
    )


def tiny_table() -> SearchTable:
    return SearchTable(
        blocks=["a", "b"],
        candidates=[["teacher", "dw"], ["teacher", "skip", "fast"]],
        score=[np.array([0.0, 0.5]), np.array([0.0, 0.9, 0.4])],
        costs={
            "latency_ms": [np.array([1.0, 0.4]), np.array([1.0, 0.1, 0.3])],
            "params": [np.array([100.0, 30.0]), np.array([100.0, 0.0, 20.0])],
        },
        offsets={"latency_ms": 0.5},
    )


def assert_within(table: SearchTable, result: SearchResult) -> None:
    for name, budget in result.budgets.items():
        assert table.total(name, result.choice) <= budget + 1e-9 * max(1.0, abs(budget))


@pytest.mark.parametrize("seed", range(30))
def test_solve_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    table = random_table(rng, int(rng.integers(3, 6)), 4, offsets=seed % 3 != 0)
    free = brute_force(table, None)
    names = ["latency_ms"] if seed % 2 == 0 else ["latency_ms", "params"]
    budgets = {}
    for name in names:
        lo, hi = minimum(table, name), free.totals[name]
        budgets[name] = lo + rng.uniform(0.1, 0.9) * (hi - lo)
    try:
        expected = brute_force(table, budgets)
    except InfeasibleBudget:
        with pytest.raises(InfeasibleBudget):
            solve(table, budgets)
        return
    got = solve(table, budgets)
    assert got.status == "optimal"
    assert got.objective == pytest.approx(expected.objective, rel=1e-7, abs=1e-9)
    assert_within(table, got)
    assert got.objective == pytest.approx(table.objective(got.choice))
    assert got.names == [table.candidates[b][c] for b, c in enumerate(got.choice)]
    assert got.totals["latency_ms"] == pytest.approx(table.total("latency_ms", got.choice))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("distance", [1, 2])
def test_solve_top_matches_enumeration(seed: int, distance: int) -> None:
    """The k best students each ``distance`` blocks from every better one: the same as ranking
    every feasible student and taking them greedily."""
    rng = np.random.default_rng(100 + seed)
    table = random_table(rng, int(rng.integers(3, 6)), 4)
    lo, hi = minimum(table, "latency_ms"), brute_force(table, None).totals["latency_ms"]
    budgets = {"latency_ms": lo + 0.6 * (hi - lo)}
    feasible = sorted(
        (table.objective(c), c)
        for c in itertools.product(*(range(len(p)) for p in table.candidates))
        if table.total("latency_ms", c) <= budgets["latency_ms"]
    )
    expected: list[tuple[int, ...]] = []
    for _, c in feasible:
        if all(sum(a != b for a, b in zip(c, e)) >= distance for e in expected):
            expected.append(c)
    got = solve_top(table, budgets, 4, min_distance=distance)
    assert len(got) == min(4, len(expected))
    objectives = [r.objective for r in got]
    assert objectives == sorted(objectives)
    want = [table.objective(c) for c in expected[: len(got)]]
    assert objectives == pytest.approx(want, rel=1e-7, abs=1e-9)
    for i, r in enumerate(got):
        assert_within(table, r)
        assert all(sum(a != b for a, b in zip(r.choice, e.choice)) >= distance for e in got[:i])


def test_solve_top_stops_when_the_space_is_exhausted() -> None:
    t = tiny_table()  # six students, all within a loose budget
    got = solve_top(t, {"latency_ms": 10.0}, 10)
    assert sorted(tuple(r.choice) for r in got) == sorted(itertools.product(range(2), range(3)))


def test_minimum_and_total_include_offset() -> None:
    t = tiny_table()
    assert minimum(t, "latency_ms") == pytest.approx(0.5 + 0.4 + 0.1)
    assert minimum(t, "params") == pytest.approx(30.0)
    assert t.total("latency_ms", [0, 0]) == pytest.approx(2.5)
    assert t.space_size_log10() == pytest.approx(math.log10(6))


def test_unconstrained_picks_teacher_and_budget_binds() -> None:
    t = tiny_table()
    assert solve(t).names == ["teacher", "teacher"]
    r = solve(t, {"latency_ms": 1.9})
    assert r.totals["latency_ms"] <= 1.9
    assert r.names == ["teacher", "fast"]  # 1.8 ms at score 0.4 beats dw+teacher (1.9 ms, 0.5)
    assert r.budgets == {"latency_ms": 1.9}


def test_infeasible_budget_names_minimum() -> None:
    t = tiny_table()
    with pytest.raises(InfeasibleBudget) as info:
        solve(t, {"latency_ms": 0.8})
    err = info.value
    assert err.cost == "latency_ms"
    assert err.budget == pytest.approx(0.8)
    assert err.minimum == pytest.approx(1.0)
    assert "latency budget 0.80 ms is infeasible" in str(err)
    assert "1.00 ms" in str(err)
    assert isinstance(err, ArchnetError)


def test_infeasible_message_with_teacher_reference() -> None:
    t = tiny_table()
    with pytest.raises(InfeasibleBudget, match=r"at least 0\.40 of the teacher"):
        solve(t, {"latency_ms": 0.8}, reference={"latency_ms": 2.5})


def test_jointly_infeasible_budgets_name_all() -> None:
    t = tiny_table()
    t.costs["params"][1] = np.array([100.0, 200.0, 0.0])
    # latency <= 1.05 needs skip (200 params in total 230); params <= 50 needs fast (1.2 ms).
    with pytest.raises(InfeasibleBudget) as info:
        solve(t, {"latency_ms": 1.05, "params": 50.0})
    msg = str(info.value)
    assert "latency" in msg and "params" in msg and "jointly" in msg
    assert info.value.cost == "latency_ms+params"
    with pytest.raises(InfeasibleBudget):
        brute_force(t, {"latency_ms": 1.05, "params": 50.0})


def test_unknown_cost_and_bad_tables() -> None:
    t = tiny_table()
    with pytest.raises(ArchnetError, match="known costs"):
        solve(t, {"energy": 1.0})
    empty = SearchTable(blocks=[], candidates=[], score=[], costs={})
    with pytest.raises(ArchnetError, match="empty"):
        solve(empty)
    hole = SearchTable(
        blocks=["a", "b"],
        candidates=[["x"], []],
        score=[np.array([0.1]), np.array([])],
        costs={"latency_ms": [np.array([1.0]), np.array([])]},
    )
    with pytest.raises(ArchnetError, match="'b' has no candidates"):
        solve(hole)
    with pytest.raises(ArchnetError, match="inconsistent"):
        SearchTable(blocks=["a"], candidates=[["x", "y"]], score=[np.array([0.1])], costs={})


def test_ties_prefer_cheaper_candidate() -> None:
    t = SearchTable(
        blocks=["a", "b"],
        candidates=[["slow", "fast"], ["x", "y"]],
        score=[np.array([0.2, 0.2]), np.array([0.1, 0.1])],
        costs={"latency_ms": [np.array([2.0, 1.0]), np.array([1.0, 1.0])]},
    )
    r = solve(t)
    assert r.names == ["fast", "x"]  # equal score: cheaper wins, then lower index
    assert brute_force(t, None).choice == r.choice


def test_solve_is_deterministic() -> None:
    rng = np.random.default_rng(11)
    table = random_table(rng, 20, 6, min_cands=4)
    # Quantised scores create many exact ties.
    table.score = [np.round(s * 4) / 4 for s in table.score]
    budget = {"latency_ms": minimum(table, "latency_ms") + 3.0}
    first = solve(table, budget)
    for _ in range(2):
        assert solve(table, budget).choice == first.choice


def test_unavailable_candidates_are_never_chosen() -> None:
    t = tiny_table()
    t.costs["latency_ms"][1] = np.array([1.0, np.inf, 0.3])
    r = solve(t, {"latency_ms": 1.3})
    assert r.names == ["dw", "fast"]
    assert minimum(t, "latency_ms") == pytest.approx(1.2)


def test_large_table_solves_optimally() -> None:
    rng = np.random.default_rng(123)
    table = random_table(rng, 100, 20, min_cands=20)
    lo = minimum(table, "latency_ms")
    hi = solve(table).totals["latency_ms"]
    r = solve(table, {"latency_ms": lo + 0.4 * (hi - lo)}, time_limit_s=30.0)
    assert r.status == "optimal"
    assert_within(table, r)
    assert table.space_size_log10() == pytest.approx(100 * math.log10(20))


def test_json_round_trip() -> None:
    t = tiny_table()
    t.costs["params"][0] = np.array([100.0, np.inf])
    d = json.loads(json.dumps(t.to_json(), allow_nan=False))
    back = SearchTable.from_json(d)
    assert back.blocks == t.blocks and back.candidates == t.candidates
    assert back.offsets == t.offsets
    for a, b in zip(back.score, t.score, strict=True):
        np.testing.assert_array_equal(a, b)
    for name in t.costs:
        for a, b in zip(back.costs[name], t.costs[name], strict=True):
            np.testing.assert_array_equal(a, b)
    r = solve(back, {"latency_ms": 2.0})
    r2 = SearchResult.from_json(json.loads(json.dumps(r.to_json())))
    assert r2 == r
    with pytest.raises(ArchnetError, match="malformed"):
        SearchTable.from_json({"blocks": []})


def test_pareto_sweep_monotone_and_within_budgets() -> None:
    rng = np.random.default_rng(7)
    table = random_table(rng, 12, 6, min_cands=3)
    results = pareto_sweep(table, "latency_ms", n=10)
    assert len(results) >= 2
    assert len({tuple(r.choice) for r in results}) == len(results)
    budgets = [r.budgets["latency_ms"] for r in results]
    assert budgets == sorted(budgets)
    for prev, cur in zip(results, results[1:], strict=False):
        assert cur.objective <= prev.objective + 1e-9
    for r in results:
        assert_within(table, r)
    assert results[0].totals["latency_ms"] == pytest.approx(minimum(table, "latency_ms"))
    assert results[-1].objective == pytest.approx(solve(table).objective)
    # Extra budgets apply to every point.
    cap = minimum(table, "params") * 1.5
    for r in pareto_sweep(table, "latency_ms", n=5, extra_budgets={"params": cap}):
        assert r.totals["params"] <= cap + 1e-6


def test_plot_writes_png(tmp_path) -> None:
    rng = np.random.default_rng(3)
    table = random_table(rng, 6, 4)
    results = pareto_sweep(table, n=6)
    out = plot_pareto(
        results,
        tmp_path / "plots" / "pareto.png",
        reference={"latency_ms": table.total("latency_ms", [0] * 6)},
        chosen=results[len(results) // 2],
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def mixed_precision_table(rng: np.random.Generator, n_blocks: int) -> SearchTable:
    """Candidates x bit widths: fewer bits shrink size (bits x weights) and raise the score."""
    bits = [8, 4, 2]
    names, score, lat, size = [], [], [], []
    for b in range(n_blocks):
        n_cands = int(rng.integers(2, 4))
        weights = rng.integers(1_000, 50_000, size=n_cands)
        base = rng.uniform(0.0, 0.5, size=n_cands)
        names.append([f"b{b}c{c}@w{w}a4" for c in range(n_cands) for w in bits])
        score.append(np.array([base[c] + 0.3 * (8 - w) / 6 for c in range(n_cands) for w in bits]))
        lat.append(np.array([0.1 + c * 0.05 for c in range(n_cands) for _ in bits]))
        size.append(
            np.array([float(weights[c] * w + 32 * 64) for c in range(n_cands) for w in bits])
        )
    return SearchTable(
        blocks=[f"block{b}" for b in range(n_blocks)],
        candidates=names,
        score=score,
        costs={"latency_ms": lat, "size_bits": size},
        offsets={"latency_ms": 0.2, "size_bits": 8 * 20_000.0},
    )


@pytest.mark.parametrize("seed", range(10))
def test_mixed_precision_respects_size_budget(seed: int) -> None:
    rng = np.random.default_rng(seed)
    table = mixed_precision_table(rng, 4)
    free = solve(table, {})
    smallest = minimum(table, "size_bits")
    budget = smallest + rng.uniform(0.1, 0.6) * (free.totals["size_bits"] - smallest)
    got = solve(table, {"size_bits": budget})
    assert got.totals["size_bits"] <= budget
    assert got.totals["size_bits"] == pytest.approx(table.total("size_bits", got.choice))
    assert got.objective == pytest.approx(brute_force(table, {"size_bits": budget}).objective)
    # the budget binds: the unconstrained optimum (all 8-bit) does not fit
    assert free.totals["size_bits"] > budget
    assert all("@w8" in name for name in free.names)
    assert list(got.choice) != list(free.choice)
