"""Latency backends, structural signatures and the SQLite cache (kept tiny and fast)."""

import dataclasses
import sqlite3
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

from archnet import onnx_utils
from archnet.errors import ArchnetError
from archnet.targets import LatencyCache, get_backend, measure_cached, module_signature
from archnet.targets.latency import (
    CachedTiming,
    CacheKey,
    LatencyBackend,
    Prepared,
    TorchBackend,
    cpu_model,
    measure_cached_group,
)

SHAPE = (1, 8, 32, 32)
FAST = {"warmup": 2, "repeats": 7}


def conv_net(width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(8, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
    )


@pytest.mark.parametrize("name", ["onnxruntime", "torch", "openvino"])
def test_backend_measures_conv_above_overhead(name: str) -> None:
    backend = get_backend(name)
    ms = backend.measure(conv_net(), SHAPE, **FAST)
    overhead = backend.overhead_ms(SHAPE, **FAST)
    assert ms > 0 and overhead > 0
    assert overhead < ms
    assert backend.overhead_ms(SHAPE) == overhead  # memoized per shape


def test_torch_backend_restores_threads_and_module_state() -> None:
    before = torch.get_num_threads()
    net = conv_net().train()
    get_backend("torch", threads=1).measure(net, SHAPE, **FAST)
    assert torch.get_num_threads() == before
    assert net.training and next(net.parameters()).device.type == "cpu"


def test_measure_many_returns_all_keys() -> None:
    modules = {"small": conv_net(8), "big": conv_net(32), "empty": nn.Identity()}
    result = get_backend("onnxruntime").measure_many(modules, SHAPE, rounds=2, **FAST)
    assert set(result) == set(modules)
    assert all(ms > 0 for ms in result.values())


def test_unknown_backend_and_device() -> None:
    with pytest.raises(ArchnetError, match="bitops, onnxruntime, openvino, torch"):
        get_backend("tensorrt")
    with pytest.raises(ArchnetError, match="supported: cpu, cuda"):
        get_backend("torch", device="tpu")
    with pytest.raises(ArchnetError, match="positive integer"):
        get_backend("torch", threads=0)


def test_cuda_unavailable_names_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("torch", "onnxruntime"):
        with pytest.raises(ArchnetError, match="available: cpu"):
            get_backend(name, device="cuda")


def test_signature_ignores_weights_but_not_structure() -> None:
    a, b = conv_net(), conv_net()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    b.train()(torch.randn(2, 8, 4, 4))  # BatchNorm's running stats and step counter move
    assert module_signature(a) == module_signature(b)
    assert module_signature(a) != module_signature(conv_net(16))
    assert module_signature(a) != module_signature(conv_net().half())
    swapped = conv_net()
    swapped[2] = nn.GELU()
    assert module_signature(a) != module_signature(swapped)
    strided = conv_net()
    strided[0].stride = (2, 2)  # a hyper-parameter, no tensor changes
    assert module_signature(a) != module_signature(strided)


class Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 2.0


class Squarer(Doubler):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * y


Squarer.__name__ = Squarer.__qualname__ = Doubler.__qualname__  # same repr, same class name


def test_signature_follows_forward_source() -> None:
    doubler, squarer = Doubler(), Squarer()
    assert repr(doubler) == repr(squarer)
    assert [p.shape for p in doubler.parameters()] == [p.shape for p in squarer.parameters()]
    assert module_signature(doubler) != module_signature(squarer)
    assert module_signature(doubler) == module_signature(Doubler())


def _sourceless(body: str) -> nn.Module:
    """A module whose forward was compiled from a string: inspect finds no source for it."""
    namespace: dict = {}
    exec(f"def forward(self, x):\n    return {body}\n", namespace)  # noqa: S102
    cls = type("Sourceless", (nn.Module,), {"forward": namespace["forward"]})
    return cls()


def test_signature_of_sourceless_forward_uses_bytecode() -> None:
    assert module_signature(_sourceless("x + 1")) != module_signature(_sourceless("x * 3"))
    assert module_signature(_sourceless("x + 1")) == module_signature(_sourceless("x + 1"))


class Flagged(nn.Module):
    """Takes one of two code paths by a bool buffer, as a quantizer's sign flag does."""

    def __init__(self, flag: bool) -> None:
        super().__init__()
        self.register_buffer("flag", torch.tensor(flag))
        self.register_buffer("table", torch.arange(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.relu() if bool(self.flag) else x


def test_signature_sees_non_floating_buffer_values() -> None:
    on, off = Flagged(True), Flagged(False)
    assert module_signature(on) != module_signature(off)
    off.flag.fill_(True)
    assert module_signature(on) == module_signature(off)
    off.table[0] = 7
    assert module_signature(on) != module_signature(off)


def test_signature_sees_quantizer_sign() -> None:
    from archnet.quant.lsq import LSQQuantizer

    signed, unsigned = LSQQuantizer(4, signed=True), LSQQuantizer(4, signed=True)
    unsigned.signed = False
    assert module_signature(signed) != module_signature(unsigned)


def _key(**kw: object) -> CacheKey:
    fields = {"backend": "torch", "runtime": "torch 9", "device": "cpu", "threads": 1}
    fields |= {"cpu": "Test CPU", "gpu": ""}
    return CacheKey(**(fields | kw))


def test_cache_put_get_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "latency.sqlite"
    row = CachedTiming(1.5, 0.25, "eager")
    with LatencyCache(path) as cache:
        assert len(cache) == 0
        assert cache.get(_key(), "sig", SHAPE) is None
        cache.put(_key(), "sig", SHAPE, row)
        cache.put(_key(), "sig", (4, *SHAPE[1:]), CachedTiming(3.0, 0.0, "eager"))
        cache.put(_key(), "sig", SHAPE, CachedTiming(1.25, 0.5, "eager"))  # overwrite
        assert cache.get(_key(), "sig", SHAPE) == CachedTiming(1.25, 0.5, "eager")
        assert cache.get(_key(), "sig", SHAPE).measured_ms == 1.75
        for other in ({"threads": 2}, {"cpu": "Other CPU"}, {"runtime": "torch 10"}, {"gpu": "X"}):
            assert cache.get(_key(**other), "sig", SHAPE) is None, other
        assert len(cache) == 2
    cache = LatencyCache(path)
    try:
        assert len(cache) == 2
        assert cache.get(_key(), "sig", (4, *SHAPE[1:])) == CachedTiming(3.0, 0.0, "eager")
    finally:
        cache.close()


def test_cache_opens_old_schema_file(tmp_path: Path) -> None:
    """A cache of the first layout opens; its rows cannot match the new key, so none is used."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE latency (backend TEXT NOT NULL, device TEXT NOT NULL, threads INTEGER"
        " NOT NULL, signature TEXT NOT NULL, shape TEXT NOT NULL, batch INTEGER NOT NULL,"
        " ms REAL NOT NULL, created REAL NOT NULL, platform TEXT NOT NULL,"
        " PRIMARY KEY (backend, device, threads, signature, shape, batch))"
    )
    conn.execute("INSERT INTO latency VALUES ('torch', 'cpu', 1, 'sig', '8x32x32', 1, 2.0, 0, '')")
    conn.commit()
    conn.close()
    with LatencyCache(path) as cache:
        assert len(cache) == 0 and cache.get(_key(), "sig", SHAPE) is None
        cache.put(_key(), "sig", SHAPE, CachedTiming(1.0, 0.0, "eager"))
        assert cache.get(_key(), "sig", SHAPE) == CachedTiming(1.0, 0.0, "eager")


def test_cache_rejects_non_sqlite_and_unknown_layout(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_text("not a database " * 100)
    with pytest.raises(ArchnetError, match="bogus.sqlite is not a usable SQLite file") as info:
        LatencyCache(bogus)
    assert "delete it" in str(info.value) and "\n" not in str(info.value)
    odd = tmp_path / "odd.sqlite"
    conn = sqlite3.connect(odd)
    conn.execute("CREATE TABLE latency_v2 (backend TEXT, ms REAL)")
    conn.commit()
    conn.close()
    with pytest.raises(ArchnetError, match="odd.sqlite.*delete it"):
        LatencyCache(odd)


def test_cpu_model_reads_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU 9000 @ 3GHz\n")
    monkeypatch.setattr("sys.platform", "linux")
    assert cpu_model(info) == "Test CPU 9000 @ 3GHz"
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "riscv64")
    assert cpu_model(tmp_path / "missing") == "riscv64"  # no model name: the architecture


def test_cache_key_names_runtime_versions_and_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    ort_backend = get_backend("onnxruntime")
    before = ort_backend.cache_key()
    assert before.cpu == cpu_model() and before.gpu == ""
    assert before.platform.startswith(cpu_model() + "; onnxruntime ")
    monkeypatch.setattr(ort, "__version__", "0.0.1-test")
    assert ort_backend.cache_key() != before
    assert "0.0.1-test" in ort_backend.cache_key().runtime
    monkeypatch.undo()
    monkeypatch.setattr(onnx_utils.onnx, "__version__", "0.0.2-test")
    assert ort_backend.cache_key() != before
    monkeypatch.undo()
    legacy = onnx_utils.legacy_exporter_available()
    monkeypatch.setattr(onnx_utils, "legacy_exporter_available", lambda: not legacy)
    assert ort_backend.cache_key() != before  # the exporter chain changed
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU")
    gpu_key = TorchBackend(device="cuda").cache_key()  # built directly: no GPU needed here
    assert gpu_key.gpu == "Test GPU" and gpu_key.device == "cuda"


def test_runtime_version_change_misses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = get_backend("torch")
    with LatencyCache(tmp_path / "c.sqlite") as cache:
        assert not measure_cached(backend, cache, conv_net(8), SHAPE, **FAST)[1]
        monkeypatch.setattr(torch, "__version__", "0.0.0-test")
        assert not measure_cached(backend, cache, conv_net(8), SHAPE, **FAST)[1]
        monkeypatch.undo()
        assert measure_cached(backend, cache, conv_net(8), SHAPE, **FAST)[1]
        assert len(cache) == 2


def test_measure_cached_hits_on_second_call(tmp_path: Path) -> None:
    backend = get_backend("torch")
    with LatencyCache(tmp_path / "c.sqlite") as cache:
        ms, hit = measure_cached(backend, cache, conv_net(), SHAPE, **FAST)
        assert ms > 0 and not hit
        again, hit = measure_cached(backend, cache, conv_net(), SHAPE, **FAST)  # new weights
        assert hit and again == ms
        _, hit = measure_cached(backend, cache, conv_net(), (2, *SHAPE[1:]), **FAST)
        assert not hit
        assert len(cache) == 2


def test_backends_time_quantized_modules_and_onnx_models() -> None:
    """onnxruntime runs a fake-quantized module as its QDQ graph and takes ONNX models as they
    are; eager PyTorch times a quantized module as its float twin and refuses ONNX."""
    import onnx

    from archnet.onnx_utils import export_onnx
    from archnet.quant import QuantConfig, calibrate, quantize_model

    shape = (1, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    quantized = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    quantize_model(quantized, QuantConfig(4, 4))
    calibrate(quantized, torch.randn(shape))
    ort_backend = get_backend("onnxruntime")
    untagged = onnx.helper.make_model(export_onnx(model, shape).graph)  # from another tool
    times = ort_backend.measure_interleaved(
        {
            "proto": (export_onnx(model, shape), shape),
            "qdq": (quantized, shape),
            "other": (untagged, shape),
        },
        rounds=1,
        warmup=1,
        repeats=2,
    )
    assert all(ms > 0 for ms in times.values())
    # the QDQ rewrite keeps the tag of the exporter underneath it
    assert times.exporters["qdq"] == times.exporters["proto"] == times.exporter != "external"
    assert times.exporters["other"] == "external"
    assert get_backend("torch").measure(quantized, shape, warmup=1, repeats=2) > 0
    with pytest.raises(ArchnetError, match="not ONNX"):
        get_backend("torch").measure(export_onnx(model, shape), shape, warmup=1, repeats=2)


def test_openvino_times_qdq_graphs_under_its_own_cache_key(monkeypatch) -> None:
    """OpenVINO runs a fake-quantized module as its QDQ graph (int8 where the CPU has it); its
    timings are keyed apart from onnxruntime's; without the package, one line says the fix."""
    from archnet.quant import QuantConfig, calibrate, quantize_model

    shape = (1, 8, 32, 32)
    quantized = conv_net(64)
    quantize_model(quantized, QuantConfig(8, 8))
    calibrate(quantized, torch.randn(shape))
    backend = get_backend("openvino")
    times = backend.measure_interleaved(
        {"fp32": (conv_net(64), shape), "w8a8": (quantized.eval(), shape)},
        rounds=1,
        warmup=1,
        repeats=3,
    )
    assert times["fp32"] > 0 and times["w8a8"] > 0
    key = backend.cache_key()
    assert key.backend == "openvino" and "openvino 20" in key.runtime
    assert key != get_backend("onnxruntime").cache_key()
    from archnet.targets import load_target

    assert load_target("openvino-cpu").latency_backend().name == "openvino"
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    with pytest.raises(ArchnetError, match=r"archnet\[openvino\]"):
        get_backend("openvino")


class NoTorchScript(nn.Sequential):
    """A module the TorchScript exporter is made to refuse in the tests below."""


def test_mixed_exporter_group_is_reexported_uniformly(monkeypatch: pytest.MonkeyPatch) -> None:
    if not onnx_utils.legacy_exporter_available():
        pytest.skip("needs the TorchScript exporter to fall back from")
    real = dict(onnx_utils._EXPORTERS)
    exported: list[tuple[str, str]] = []

    def spy(name: str):  # noqa: ANN202
        def export(module: nn.Module, x: torch.Tensor, opset: int):  # noqa: ANN202
            exported.append((name, type(module).__name__))
            if name == "torchscript" and isinstance(module, NoTorchScript):
                raise RuntimeError("refused for the test")
            return real[name](module, x, opset)

        return export

    for name in real:
        monkeypatch.setitem(onnx_utils._EXPORTERS, name, spy(name))
    picky = NoTorchScript(nn.Conv2d(8, 8, 1), nn.ReLU())
    items = {"plain": (conv_net(8), SHAPE), "picky": (picky, SHAPE)}
    times = get_backend("onnxruntime").measure_interleaved(items, rounds=1, warmup=1, repeats=2)
    assert isinstance(times, dict) and set(times) == {"plain", "picky"}
    assert all(ms > 0 for ms in times.values())
    assert times.exporters == {"plain": times.exporter, "picky": times.exporter}
    assert times.exporter.startswith("dynamo/")
    assert times.reexported == ("plain",)
    assert ("dynamo", "Sequential") in exported  # really re-exported, not just relabelled


class TaggedBackend(LatencyBackend):
    """Exports nothing: which exporter each module gets first, and which it refuses, is given."""

    name = "tagged"

    def __init__(self, first: dict[str, str], refuses: dict[str, set[str]]) -> None:
        super().__init__()
        self.first, self.refuses = first, refuses
        self.prepared: list[tuple[str, str | None]] = []

    def runtime(self) -> str:
        return "tagged 1"

    def _prepare(self, module, input_shape, exporter=None) -> Prepared:  # noqa: ANN001
        label = getattr(module, "label", "floor")
        self.prepared.append((label, exporter))
        if exporter in self.refuses.get(label, set()):
            raise RuntimeError(f"{label} refuses {exporter}\nwith a long trace")
        fixed = label.startswith("proto")
        return Prepared(exporter or self.first.get(label, "torchscript/opset17"), module, fixed)

    def _runner(self, prepared: Prepared, input_shape):  # noqa: ANN001, ANN202
        return lambda: None


def _labelled(label: str) -> nn.Module:
    module = nn.Identity()
    module.label = label
    return module


def test_group_falls_further_back_when_the_common_exporter_fails() -> None:
    """b needs dynamo; the floor cannot take dynamo at 17, so all go to dynamo at 18."""
    backend = TaggedBackend({"b": "dynamo/opset17"}, {"floor": {"dynamo/opset17"}})
    items = {
        "a": (_labelled("a"), SHAPE),
        "b": (_labelled("b"), SHAPE),
        "floor": (nn.Identity(), SHAPE),
    }
    times = backend.measure_interleaved(items, rounds=1, warmup=0, repeats=1)
    assert set(times.exporters.values()) == {"dynamo/opset18"}
    assert times.reexported == ("a", "b", "floor")
    assert ("floor", "dynamo/opset17") in backend.prepared


def test_group_without_a_common_exporter_is_refused() -> None:
    backend = TaggedBackend({"b": "dynamo/opset18"}, {"a": {"dynamo/opset18"}})
    items = {"a": (_labelled("a"), SHAPE), "b": (_labelled("b"), SHAPE)}
    with pytest.raises(ArchnetError, match="cannot time a, b from one ONNX exporter") as info:
        backend.measure_interleaved(items, rounds=1, warmup=0, repeats=1)
    assert "\n" not in str(info.value)
    handed_in = {"proto": (_labelled("proto"), SHAPE), "b": (_labelled("b"), SHAPE)}
    with pytest.raises(ArchnetError, match="proto handed in exported otherwise"):
        backend.measure_interleaved(handed_in, rounds=1, warmup=0, repeats=1)


def test_cached_group_keeps_each_modules_exporter(tmp_path: Path) -> None:
    backend = TaggedBackend({"b": "dynamo/opset18"}, {})
    modules = {"a": _labelled("a"), "b": _labelled("b"), "twin": _labelled("a")}
    with LatencyCache(tmp_path / "c.sqlite") as cache:
        first = measure_cached_group(backend, cache, modules, SHAPE, rounds=1, warmup=0, repeats=1)
        assert first.hits == 0 and set(first.exporters.values()) == {"dynamo/opset18"}
        timed = len(backend.prepared)
        again = measure_cached_group(backend, cache, modules, SHAPE, rounds=1, warmup=0, repeats=1)
        assert len(backend.prepared) == timed  # nothing exported or timed
        assert again == dataclasses.replace(first, hits=3)
        assert first.ms["a"] == first.ms["twin"]  # one signature, one row, one time
