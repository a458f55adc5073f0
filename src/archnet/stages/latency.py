"""The latency stage: time every choice at its block's input shape, then check the budgets.

The budgets can be checked here, before any distillation: every cost of every choice is known,
so the cheapest possible student is too. A budget below it ends the run now rather than after
the hours that training and scoring take.

Timing runs one group at a time (concurrent timings on one machine would disturb each other).
With ``--executor ray``, each group the cache lacks is a Ray job pinned to a node that
carries the target (a custom resource ``target:NAME``, e.g. ``ray start --resources
'{"target:cpu-ort": 1}'``); where no node carries it, this process times. Only this process
writes the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from archnet.costs import block_latency_table
from archnet.errors import ArchnetError
from archnet.results import LatencyTable, PoolResult
from archnet.search import SearchTable, solve
from archnet.stages import common
from archnet.store import RunStore
from archnet.targets import LatencyCache


def cache_path(store: RunStore) -> Path:
    shared = store.config.latency.cache
    return Path(shared).expanduser() if shared else store.path("latency.sqlite")


def run(store: RunStore) -> LatencyTable:
    """Time every candidate at its real input shape, the outside parts and the whole teacher."""
    pools = store.load("pool.json", PoolResult)
    backend = _pinned(store, common.target(store).latency_backend())
    cfg = store.config.latency
    quantized = common.bit_options(store) != [None]
    with LatencyCache(cache_path(store)) as cache, common.progress_bar() as bar:
        # every choice, each teacher block (the reference, even where the target rejects it),
        # the outside parts and the whole teacher
        total = sum(len({"teacher", *p["choices"]}) for p in pools.pools.values()) + 2
        task = bar.add_task(
            f"latency ({backend.name}, {backend.device}, {backend.threads} thread(s))", total=total
        )
        shell, _ = common.shell(store)
        table = block_latency_table(
            backend,
            cache,
            store.teacher,
            common.specs(store),
            pools.pools,
            common.input_shape(store),
            cfg,
            on_done=lambda: bar.advance(task),
            shell=shell,
            quantize_outside=(lambda m, x: common.quantize_outside(store, m, x))
            if quantized
            else None,
            requantize=common.target(store).requantize,
        )
    return LatencyTable.from_json(table)


def _on_node(backend, payload: tuple, _needed=None):
    """A latency job on a node that carries the target: its cache key, or a group's times."""
    what, items, kw = payload
    return backend.cache_key() if what == "key" else backend.measure_interleaved(items, **kw)


class PinnedBackend:
    """The target's backend as a Ray node that carries it runs it: the cache key (that node's
    CPU and runtime) and every measurement come from there, one job at a time."""

    def __init__(self, backend, executor, resource: str) -> None:
        self._backend, self._executor, self.resource = backend, executor, resource
        self._key = self._call("key")

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def _call(self, what: str, items=None, kw=None):
        from archnet.executors import Job

        job = Job(what, (what, items, kw or {}))
        (outcome,) = self._executor.run(_on_node, self._backend, [job], {})
        if outcome.error:
            raise ArchnetError(f"a latency job on a {self.resource} node failed: {outcome.error}")
        return outcome.result

    def cache_key(self):
        return self._key

    def measure_interleaved(self, items, **kw):
        return self._call("measure", items, kw)


def _pinned(store: RunStore, backend):
    """Under ``--executor ray``, ``backend`` run on a node carrying ``target:NAME`` (where
    one exists); else ``backend`` itself, in this process (a cost model runs anywhere)."""
    if store.config.executor != "ray" or backend.estimated:
        return backend
    from archnet.executors import build_executor

    resource = f"target:{common.target(store).name}"
    executor = build_executor(
        "ray", cpus=backend.threads, resources={resource: 1}, address=store.config.ray_address
    )
    if resource not in executor.ray.cluster_resources():
        common.warn(f"no Ray node carries the resource {resource!r}: this machine times the target")
        return backend
    return PinnedBackend(backend, executor, resource)


def cost_table(pools: PoolResult, latency: LatencyTable, scores: dict | None = None) -> SearchTable:
    """The ILP's table; without scores (before training) every score is zero, which is enough
    to tell whether a budget can be met."""
    names = list(pools.pools)
    cands = [pools.pools[b]["choices"] for b in names]

    def col(f) -> list[np.ndarray]:
        return [np.array([f(b, c) for c in cs], dtype=float) for b, cs in zip(names, cands)]

    def cost(key: str):
        return col(lambda b, c: pools.pools[b]["costs"][c][key])

    return SearchTable(
        blocks=names,
        candidates=cands,
        score=col(lambda b, c: scores[b][c]["kl"] if scores else 0.0),
        costs={
            "latency_ms": col(lambda b, c: latency.blocks[b][c]),
            "params": cost("params"),
            "macs": cost("macs"),
            "size_bits": cost("size_bits"),
        },
        offsets={
            "latency_ms": latency.outside_ms,
            "params": latency.outside_params,
            "macs": latency.outside_macs,
            "size_bits": latency.outside_size_bits,
        },
    )


def budgets(store: RunStore, latency: LatencyTable) -> dict[str, float]:
    """The config's budgets in absolute units.

    A relative latency budget resolves against the teacher's latency in the same table (the
    sum of its measured parts), so budget and candidates share one scale and the machine's
    drift between two measurements cannot loosen or tighten the ratio.
    """
    from archnet.config import parse_budget

    cfg = store.config
    out = {"latency_ms": parse_budget(cfg.budget, "latency").resolve(latency.teacher_predicted_ms)}
    for key, what, text, ref in (
        ("params", "params", cfg.params_budget, latency.teacher_params),
        ("macs", "macs", cfg.macs_budget, latency.teacher_macs),
        ("size_bits", "size", cfg.size_budget, latency.teacher_size_bits),
    ):
        if text:
            out[key] = parse_budget(text, what).resolve(ref)
    return out


def limits(store: RunStore, latency: LatencyTable) -> dict[str, float]:
    """The budgets the search enforces: the latency budget less ``budget_margin`` of it, so
    that timing noise does not take the measured student over the budget (counts are exact),
    and divided by ``latency_correction`` where a measured student showed the table's
    prediction too low."""
    out = budgets(store, latency)
    out["latency_ms"] *= (1.0 - store.config.budget_margin) / store.config.latency_correction
    return out


def reference(latency: LatencyTable) -> dict[str, float]:
    """The teacher's totals, for infeasibility messages."""
    return {
        "latency_ms": latency.teacher_predicted_ms,
        "params": latency.teacher_params,
        "macs": latency.teacher_macs,
        "size_bits": latency.teacher_size_bits,
    }


def check_budgets(store: RunStore) -> None:
    """Raise InfeasibleBudget (naming the smallest achievable value) when no student fits."""
    latency = store.load("latency.json", LatencyTable)
    table = cost_table(store.load("pool.json", PoolResult), latency)
    solve(table, limits(store, latency), reference=reference(latency))
