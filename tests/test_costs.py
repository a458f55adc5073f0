"""Block stubs, the outside-the-blocks network, and the per-candidate latency table."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from archnet.blocks import BlockSpec, find_blocks
from archnet.costs import BlockStub, block_latency_table, outside_network
from archnet.flops import count_macs, count_params
from archnet.onnx_utils import INPUT_NAME, export_chain, export_onnx, ort_session
from archnet.targets import LatencyCache, get_backend
from archnet.targets.latency import LatencyBackend, Prepared, Timings
from archnet.zoo import create_model

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_resnet").eval()


@pytest.fixture(scope="module")
def specs(teacher: nn.Module) -> list[BlockSpec]:
    return find_blocks(teacher, SHAPE)


@pytest.mark.parametrize("out_shape", [(8, 4, 4), (32, 2, 2), (10,)])
def test_block_stub_output_shape(out_shape: tuple[int, ...]) -> None:
    stub = BlockStub(out_shape)
    y = stub(torch.randn(3, 16, 8, 8))
    assert y.shape == (3, *out_shape)
    assert torch.all(y == 0)
    assert count_params(stub) == 0


def test_block_stub_depends_on_its_input() -> None:
    """One input element reaches the output, so nothing upstream can be optimized away."""
    stub = BlockStub((4, 2, 2))
    x = torch.randn(2, 3, 5, 5)
    x[0, 0, 0, 0] = float("nan")
    y = stub(x)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()


def _nan_stem(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.conv1.weight.fill_(float("nan"))
    return model


def test_outside_network_keeps_stem_and_head(teacher: nn.Module, specs) -> None:
    shell = outside_network(teacher, specs)
    assert all(isinstance(shell.get_submodule(s.name), BlockStub) for s in specs)
    assert not isinstance(teacher.get_submodule(specs[0].name), BlockStub)  # teacher intact
    assert count_params(shell) == count_params(teacher) - sum(
        count_params(teacher.get_submodule(s.name)) for s in specs
    )
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        y = shell(x)
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        # the stem's weights reach the output: break them and the output breaks
        assert torch.isnan(_nan_stem(outside_network(teacher, specs))(x)).all()
        # and the head's weights too
        head = outside_network(teacher, specs)
        head.fc.bias.add_(1.0)
        torch.testing.assert_close(head(x), y + 1.0)


def test_outside_network_exports_with_stem(teacher: nn.Module, specs, tmp_path: Path) -> None:
    shell = outside_network(teacher, specs)
    path = tmp_path / "outside.onnx"
    model = export_onnx(shell, (1, *SHAPE), path)
    assert path.is_file()
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1  # the stem; every block conv is gone
    assert onnx.load(str(path)).graph.node

    x = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    got = ort_session(model).run(None, {INPUT_NAME: x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, shell(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)

    # the optimized runtime graph still computes the stem: NaN weights poison the output
    broken = export_onnx(_nan_stem(outside_network(teacher, specs)), (1, *SHAPE))
    assert np.isnan(ort_session(broken).run(None, {INPUT_NAME: x})[0]).all()


def test_block_latency_table(teacher: nn.Module, specs, tmp_path: Path) -> None:
    backend = get_backend("onnxruntime")
    cfg = SimpleNamespace(warmup=2, repeats=5, rounds=2)
    pools = {s.name: {"choices": ["teacher", "skip"]} for s in specs}
    input_shape = (1, *SHAPE)
    calls: list[int] = []
    with LatencyCache(tmp_path / "latency.sqlite") as cache:
        table = block_latency_table(
            backend, cache, teacher, specs, pools, input_shape, cfg, on_done=lambda: calls.append(1)
        )
        n_candidates = 2 * len(specs)
        assert len(calls) == n_candidates + 2  # each candidate, the outside part, the teacher
        assert set(table["blocks"]) == {s.name for s in specs}
        for name, row in table["blocks"].items():
            assert set(row) == {"teacher", "skip"}, name
            assert all(ms >= 0.0 for ms in row.values())
        for key in ("outside_ms", "teacher_ms", "teacher_predicted_ms"):
            assert table[key] >= 0.0, key
        assert table["teacher_ms"] > 0.0
        assert table["backend"] == "onnxruntime" and table["device"] == "cpu"
        assert table["batch_size"] == 1 and table["input_shape"] == [1, *SHAPE]
        assert table["teacher_params"] == count_params(teacher)
        block_params = sum(count_params(teacher.get_submodule(s.name)) for s in specs)
        assert table["outside_params"] == count_params(teacher) - block_params
        assert table["teacher_macs"] == count_macs(teacher, SHAPE)
        assert 0 < table["outside_macs"] < table["teacher_macs"]
        assert table["teacher_predicted_ms"] == pytest.approx(
            table["outside_ms"] + sum(row["teacher"] for row in table["blocks"].values())
        )
        assert set(table["overhead_ms"]) == {"x".join(map(str, (1, *s.in_shape))) for s in specs}
        first_hits = table["cache_hits"]
        assert first_hits < n_candidates + 1
        rows = len(cache)

        exporters = table["exporters"]
        assert set(exporters["blocks"]) == set(table["blocks"])
        tags = {t for row in exporters["blocks"].values() for t in row.values()}
        tags |= {exporters[k] for k in ("outside", "teacher_outside", "teacher")}
        assert tags <= set(export_chain())

        again = block_latency_table(backend, cache, teacher, specs, pools, input_shape, cfg)
        # every candidate, the outside parts and the teacher come from the cache
        assert again["cache_hits"] == n_candidates + 2
        assert len(cache) == rows
        assert {k: v for k, v in again.items() if k != "cache_hits"} == {
            k: v for k, v in table.items() if k != "cache_hits"
        }


def _quick_table(teacher: nn.Module, specs, pools: dict, **kw) -> dict:
    """A latency table with few samples and no cache file: for what it contains, not timings."""
    return block_latency_table(
        get_backend("onnxruntime"),
        LatencyCache(":memory:"),
        teacher,
        specs,
        pools,
        (1, *SHAPE),
        SimpleNamespace(warmup=1, repeats=3, rounds=2),
        **kw,
    )


def test_block_latency_table_skips_candidates_not_in_pool(teacher, specs, tmp_path) -> None:
    """A block whose pool lists only the teacher is timed for the teacher only."""
    pools = {s.name: {"choices": ["teacher"]} for s in specs}
    pools[specs[0].name] = {"choices": ["teacher", "skip"]}
    table = _quick_table(teacher, specs, pools)
    assert set(table["blocks"][specs[0].name]) == {"teacher", "skip"}
    assert all(set(table["blocks"][s.name]) == {"teacher"} for s in specs[1:])


def test_block_latency_table_quantized_choices(teacher: nn.Module, specs) -> None:
    """Quantized choices are timed as QDQ graphs; the outside parts are costed quantized."""
    from archnet.quant import QuantConfig, calibrate, fold_bn, model_size_bits, quantize_model

    def quantize_outside(model: nn.Module, x: torch.Tensor) -> nn.Module:
        fold_bn(model, x)
        quantize_model(model, QuantConfig(4, 4, (8, 8)))
        calibrate(model, x)
        return model

    pools = {s.name: {"choices": ["teacher", "teacher@w8a8"]} for s in specs}
    table = _quick_table(teacher, specs, pools, quantize_outside=quantize_outside)
    for row in table["blocks"].values():
        assert set(row) == {"teacher", "teacher@w8a8"}
    outside = outside_network(teacher, specs)
    stubs = [m for m in outside.modules() if isinstance(m, BlockStub)]
    float_outside = model_size_bits(outside) - sum(model_size_bits(m) for m in stubs)
    assert table["teacher_size_bits"] == model_size_bits(teacher)
    # every outside weight at 8 or 4 bits instead of 32
    assert table["outside_size_bits"] < float_outside / 3


class CountingBackend(LatencyBackend):
    """Times nothing: each item costs 1 ms per 1000 parameters plus a drift that grows with
    every call, so a number measured twice comes out different."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.timed: list[list[str]] = []

    def runtime(self) -> str:
        return "counting 1"

    def _prepare(self, module, input_shape, exporter=None) -> Prepared:  # noqa: ANN001
        return Prepared("torchscript/opset17", module)

    def _runner(self, prepared: Prepared, input_shape):  # noqa: ANN001, ANN202
        return lambda: None

    def measure_interleaved(self, items, rounds=5, warmup=10, repeats=50) -> Timings:  # noqa: ANN001
        self.timed.append(list(items))
        drift = 0.125 * len(self.timed)
        ms = {key: drift + count_params(m) / 1000 for key, (m, _) in items.items()}
        return Timings(ms, dict.fromkeys(items, "torchscript/opset17"))


def test_block_latency_table_is_reproducible_from_one_cache(teacher, specs, tmp_path) -> None:
    """Two runs on one cache file get one table, re-initialised weights or not; the second
    measures nothing, not even the outside parts or the whole teacher."""
    pools = {s.name: {"choices": ["teacher", "skip"]} for s in specs}
    cfg = SimpleNamespace(warmup=1, repeats=1, rounds=1)
    backend = CountingBackend()
    path = tmp_path / "shared.sqlite"
    with LatencyCache(path) as cache:
        first = block_latency_table(backend, cache, teacher, specs, pools, (1, *SHAPE), cfg)
    assert backend.timed  # the first run measured
    assert first["teacher_ms"] > first["outside_ms"] > 0.0
    torch.manual_seed(1)
    other_run = create_model("tiny_resnet").eval()  # same structure, other initialisation
    fresh = CountingBackend()
    with LatencyCache(path) as cache:
        second = block_latency_table(fresh, cache, other_run, specs, pools, (1, *SHAPE), cfg)
    assert fresh.timed == []
    assert second["cache_hits"] == 2 * len(specs) + 2
    same = ("blocks", "teacher_blocks", "outside_ms", "teacher_outside_ms", "overhead_ms")
    for key in (*same, "teacher_ms", "teacher_predicted_ms", "exporters"):
        assert second[key] == first[key], key
    assert second["exporters"]["teacher"] == "torchscript/opset17"
    assert set(second["exporters"]["blocks"][specs[0].name]) == {"teacher", "skip"}


def test_outside_parts_are_timed_as_one_group_with_a_floor(teacher, specs) -> None:
    backend = CountingBackend()
    pools = {s.name: {"choices": ["teacher"]} for s in specs}
    cfg = SimpleNamespace(warmup=1, repeats=1, rounds=1)
    shell = outside_network(teacher, [])  # a distinct shell: its outside is timed too
    shell.fc = nn.Linear(shell.fc.in_features, 10, bias=False)
    table = block_latency_table(
        backend, LatencyCache(":memory:"), teacher, specs, pools, (1, *SHAPE), cfg, shell=shell
    )
    *_, wholes = backend.timed
    parts = {"outside", "teacher", "teacher_outside"}
    assert parts < set(wholes) and len(wholes) == len(parts) + 1  # and the floor
    assert table["outside_ms"] != table["teacher_outside_ms"]  # the shell's own outside
    # whole networks keep the per-call floor, which the additive model counts once
    assert table["teacher_ms"] == pytest.approx(
        0.125 * len(backend.timed) + count_params(teacher) / 1000
    )
