"""ONNX export and onnxruntime sessions shared by latency measurement and deployment checks.

Candidate blocks are exported many times during a search, so export favours the fast
TorchScript-based exporter while the installed torch still ships it and falls back to the
torch.export-based (dynamo) one otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from archnet.errors import ArchnetError

__all__ = [
    "ExportMismatchError",
    "check_against_torch",
    "eval_mode",
    "export_onnx",
    "legacy_exporter_available",
    "ort_session",
    "sample_input",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"

# Loggers that print progress or version-conversion notes during export; muted so that a
# search exporting hundreds of blocks keeps a readable console.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


class ExportMismatchError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond tolerance: the exported graph is not trustworthy."""


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Restoring per submodule (not just the root) keeps deliberately frozen parts frozen when
    the caller is in the middle of training.
    """
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter warnings and progress logs for the duration of one export."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a random input must have to match the module's floating weights."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def sample_input(
    module: nn.Module, input_shape: Sequence[int], device: str = "cpu"
) -> torch.Tensor:
    """Random input of the given shape (with batch) in the module's floating dtype."""
    return torch.randn(tuple(input_shape), dtype=_float_dtype(module), device=device)


def _export_legacy(module: nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (x,),
        buf,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
    return onnx.load_model_from_string(buf.getvalue())


# Oldest opset the dynamo exporter emits natively; older ones go through a version converter
# that fails on some graphs (an identity graph, for one).
_DYNAMO_MIN_OPSET = 18


def _export_dynamo(module: nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    kwargs = {"dynamo": True, "verbose": False} if _accepts_dynamo_flag() else {}

    def export(version: int) -> onnx.ModelProto:
        program = torch.onnx.export(
            module,
            (x,),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=version,
            **kwargs,
        )
        return program.model_proto

    try:
        return export(opset)
    except Exception:
        if opset >= _DYNAMO_MIN_OPSET:
            raise
    return export(_DYNAMO_MIN_OPSET)


@functools.cache
def _accepts_dynamo_flag() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


@functools.cache
def legacy_exporter_available() -> bool:
    """Whether ``torch.onnx.export(..., dynamo=False)`` still works in the installed torch.

    Probed once on a one-layer network because a future torch may keep the flag but raise.
    """
    if not _accepts_dynamo_flag():
        return False
    probe = nn.Sequential(nn.Conv2d(1, 1, 1)).eval()
    try:
        with _quiet(), torch.no_grad():
            _export_legacy(probe, torch.randn(1, 1, 2, 2), 17)
    except Exception:  # any failure means the legacy path is unusable
        return False
    return True


_Exporter = Callable[[nn.Module, torch.Tensor, int], onnx.ModelProto]
_EXPORTERS: dict[str, _Exporter] = {"torchscript": _export_legacy, "dynamo": _export_dynamo}


def _exporter_order() -> list[str]:
    return ["torchscript", "dynamo"] if legacy_exporter_available() else ["dynamo"]


def export_onnx(
    module: nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """Export ``module`` at a fixed input shape (with batch) and check the result.

    A fixed shape is used on purpose: latency is measured at each block's real shape, and
    static shapes let the runtime pick its fastest kernels. If the TorchScript exporter
    rejects a module, the dynamo exporter gets a second chance before giving up.
    """
    cpu_module = module if _device(module).type == "cpu" else copy.deepcopy(module).cpu()
    x = sample_input(cpu_module, input_shape)
    errors: list[str] = []
    model: onnx.ModelProto | None = None
    with eval_mode(cpu_module), _quiet(), torch.no_grad():
        for name in _exporter_order():
            try:
                model = _EXPORTERS[name](cpu_module, x, opset)
                break
            except Exception as exc:  # reported together below
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
    if model is None:
        raise RuntimeError(f"ONNX export of {type(module).__name__} failed ({'; '.join(errors)})")
    onnx.checker.check_model(model)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(path))
    return model


def _model_bytes(model: onnx.ModelProto | bytes | str | Path) -> bytes | str:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    path = Path(model)
    if not path.is_file():
        raise ArchnetError(f"ONNX model file not found: {path}")
    return str(path)


def _cpu_providers() -> list[str]:
    return ["CPUExecutionProvider"]


def _cuda_providers() -> list[str]:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ArchnetError(
            "onnxruntime has no CUDAExecutionProvider here (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use "
            "device 'cpu'"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


_PROVIDERS: dict[str, Callable[[], list[str]]] = {"cpu": _cpu_providers, "cuda": _cuda_providers}


def ort_session(
    model: onnx.ModelProto | bytes | str | Path,
    threads: int = 1,
    device: str = "cpu",
    optimize: bool = True,
) -> ort.InferenceSession:
    """An inference session configured for reproducible latency measurement.

    One inter-op thread and sequential execution keep timings stable; ``threads`` controls the
    intra-op parallelism a deployment would actually get. ``optimize=False`` runs the graph
    as written: a QDQ graph then computes exactly what its operators say, without the
    runtime's integer kernels and their own rounding.
    """
    if device not in _PROVIDERS:
        raise ArchnetError(
            f"unknown onnxruntime device {device!r}; use one of: {', '.join(_PROVIDERS)}"
        )
    providers = _PROVIDERS[device]()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    return ort.InferenceSession(_model_bytes(model), sess_options=options, providers=providers)


def _flatten(output: object) -> list[np.ndarray]:
    """Torch outputs (tensor, or nested tuple/list of tensors) as numpy arrays in ONNX order."""
    if isinstance(output, torch.Tensor):
        return [output.detach().float().cpu().numpy()]
    if isinstance(output, (tuple, list)):
        return [arr for item in output for arr in _flatten(item)]
    raise TypeError(f"cannot compare module output of type {type(output).__name__}")


def check_against_torch(
    module: nn.Module,
    model_proto: onnx.ModelProto,
    input: torch.Tensor,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    optimize: bool = True,
) -> float:
    """Max absolute difference between ORT and PyTorch outputs on ``input``.

    Raises ExportMismatchError when any element is outside ``atol + rtol * |torch|``, so a
    silently wrong export is caught before its latency is trusted.
    """
    with eval_mode(module), torch.no_grad():
        expected = _flatten(module(input.to(_device(module))))
    session = ort_session(model_proto, optimize=optimize)
    feed = {session.get_inputs()[0].name: input.detach().cpu().numpy()}
    got = session.run(None, feed)
    if len(got) != len(expected):
        raise ExportMismatchError(f"ONNX gives {len(got)} outputs, PyTorch {len(expected)}")
    max_diff = 0.0
    for ref, out in zip(expected, got, strict=True):
        out = np.asarray(out, dtype=np.float32)
        if ref.shape != out.shape:
            raise ExportMismatchError(f"output shape {out.shape} != PyTorch {ref.shape}")
        diff = np.abs(out - ref)
        max_diff = max(max_diff, float(diff.max(initial=0.0)))
        if not np.all(diff <= atol + rtol * np.abs(ref)):
            raise ExportMismatchError(
                f"ONNX output differs from PyTorch by up to {float(diff.max()):.3g} "
                f"(rtol={rtol}, atol={atol})"
            )
    return max_diff


def ort_outputs(
    model_proto: onnx.ModelProto, images: torch.Tensor, optimize: bool = True, threads: int = 1
) -> np.ndarray:
    """First output of an exported model over ``images``, in batches of its fixed batch size.

    Exports here have a static batch; the last batch is padded and the padding dropped.
    """
    dim = model_proto.graph.input[0].type.tensor_type.shape.dim[0]
    batch = dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else len(images)
    session = ort_session(model_proto, threads=threads, optimize=optimize)
    name = session.get_inputs()[0].name
    outs = []
    for lo in range(0, len(images), batch):
        x = images[lo : lo + batch].detach().float().cpu().numpy()
        real = len(x)
        if real < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - real, axis=0)])
        outs.append(np.asarray(session.run(None, {name: x})[0])[:real])
    return np.concatenate(outs)
