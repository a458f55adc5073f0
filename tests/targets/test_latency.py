"""Latency backends, structural signatures and the SQLite cache (kept tiny and fast)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from archnet.errors import ArchnetError
from archnet.targets import LatencyCache, get_backend, measure_cached, module_signature

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


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
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
    with pytest.raises(ArchnetError, match="onnxruntime, torch"):
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
    assert module_signature(a) == module_signature(b)
    assert module_signature(a) != module_signature(conv_net(16))
    assert module_signature(a) != module_signature(conv_net().half())
    swapped = conv_net()
    swapped[2] = nn.GELU()
    assert module_signature(a) != module_signature(swapped)


def test_cache_put_get_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "latency.sqlite"
    with LatencyCache(path) as cache:
        assert len(cache) == 0
        assert cache.get("torch", "cpu", 1, "sig", SHAPE) is None
        cache.put("torch", "cpu", 1, "sig", SHAPE, 1.5)
        cache.put("torch", "cpu", 1, "sig", (4, *SHAPE[1:]), 3.0)
        cache.put("torch", "cpu", 1, "sig", SHAPE, 1.25)  # overwrite, not duplicate
        assert cache.get("torch", "cpu", 1, "sig", SHAPE) == 1.25
        assert cache.get("torch", "cpu", 2, "sig", SHAPE) is None
        assert len(cache) == 2
    cache = LatencyCache(path)
    try:
        assert len(cache) == 2
        assert cache.get("torch", "cpu", 1, "sig", (4, *SHAPE[1:])) == 3.0
    finally:
        cache.close()


def test_cache_rejects_non_sqlite(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_text("not a database " * 100)
    with pytest.raises(ArchnetError, match="SQLite"):
        LatencyCache(bogus)


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
    from archnet.onnx_utils import export_onnx
    from archnet.quant import QuantConfig, calibrate, quantize_model

    shape = (1, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    quantized = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    quantize_model(quantized, QuantConfig(4, 4))
    calibrate(quantized, torch.randn(shape))
    ort_backend = get_backend("onnxruntime")
    times = ort_backend.measure_interleaved(
        {"proto": (export_onnx(model, shape), shape), "qdq": (quantized, shape)},
        rounds=1,
        warmup=1,
        repeats=2,
    )
    assert all(ms > 0 for ms in times.values())
    assert get_backend("torch").measure(quantized, shape, warmup=1, repeats=2) > 0
    with pytest.raises(ArchnetError, match="not ONNX"):
        get_backend("torch").measure(export_onnx(model, shape), shape, warmup=1, repeats=2)
