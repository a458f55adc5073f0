"""ONNX export and onnxruntime sessions shared by latency measurement and deployment checks.

Candidate blocks are exported many times during a search, so export favours the fast
TorchScript-based exporter while the installed torch still ships it and falls back to the
torch.export-based (dynamo) one otherwise. Exporters differ in the graphs they emit, and so in
latency, so every exported model names the exporter and opset that produced it (``exporter_of``)
and modules timed against each other can be exported alike (``common_exporter``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from archnet.errors import ArchnetError

__all__ = [
    "EXPORTER_KEY",
    "ExportMismatchError",
    "OnnxIO",
    "check_against_torch",
    "common_exporter",
    "eval_mode",
    "export_chain",
    "export_onnx",
    "exporter_of",
    "legacy_exporter_available",
    "ort_session",
    "sample_input",
    "stamp_exporter",
    "uniform_exporters",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"
EXPORTER_KEY = "archnet.exporter"
"""metadata_props key of the exporter tag, e.g. ``"torchscript/opset17"``."""

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


@dataclass(frozen=True)
class OnnxIO:
    """Names of a graph's inputs and outputs and its dynamic axes (``{name: {axis: label}}``).

    The default is the single ``input`` and ``output`` of a block exported at a fixed shape;
    a model with several inputs (a decoder step with its caches) names each one, so a runtime
    feeds them by name."""

    inputs: tuple[str, ...] = (INPUT_NAME,)
    outputs: tuple[str, ...] = (OUTPUT_NAME,)
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None


_ONE_IO = OnnxIO()


@contextlib.contextmanager
def _positional(module: nn.Module) -> Iterator[None]:
    """Show the TorchScript exporter a ``forward(*xs)``: it fills in every further parameter's
    default and traces it as a tensor, so ``is_causal=False`` (timm's attention) would reach
    ``scaled_dot_product_attention`` as a tensor and fail. The module stays the root, so node
    scopes still name its layers."""
    own = module.__dict__.get("forward")
    bound = module.forward
    module.forward = lambda *xs: bound(*xs)
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _as_tuple(x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _export_legacy(
    module: nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    opset: int,
    names: OnnxIO = _ONE_IO,
) -> onnx.ModelProto:
    buf = io.BytesIO()
    with _positional(module):
        torch.onnx.export(
            module,
            _as_tuple(x),
            buf,
            input_names=list(names.inputs),
            output_names=list(names.outputs),
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes=_plain_axes(names),
            dynamo=False,
        )
    return onnx.load_model_from_string(buf.getvalue())


def _plain_axes(names: OnnxIO) -> dict[str, dict[int, str]] | None:
    if not names.dynamic_axes:
        return None
    return {name: dict(axes) for name, axes in names.dynamic_axes.items()}


# Oldest opset the dynamo exporter emits natively; older ones go through a version converter
# that fails on some graphs (an identity graph, for one).
_DYNAMO_MIN_OPSET = 18


def _export_dynamo(
    module: nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    opset: int,
    names: OnnxIO = _ONE_IO,
) -> onnx.ModelProto:
    kwargs = {"dynamo": True, "verbose": False} if _accepts_dynamo_flag() else {}
    axes = _plain_axes(names)
    if axes:
        kwargs["dynamic_axes"] = axes
    program = torch.onnx.export(
        module,
        _as_tuple(x),
        None,
        input_names=list(names.inputs),
        output_names=list(names.outputs),
        opset_version=opset,
        **kwargs,
    )
    return program.model_proto


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


# (module, example input(s), opset[, names]): the names are passed only when not the default
# single input/output, so an exporter written for one input (a test's spy) keeps working.
_Exporter = Callable[..., onnx.ModelProto]
# In fallback order: a later exporter is the one a group of modules falls back to together.
_EXPORTERS: dict[str, _Exporter] = {"torchscript": _export_legacy, "dynamo": _export_dynamo}
_TAG = re.compile(r"(?P<name>[a-z_]+)/opset(?P<opset>[0-9]+)")


def _tag(name: str, opset: int) -> str:
    return f"{name}/opset{opset}"


def _parse_tag(tag: str) -> tuple[str, int]:
    match = _TAG.fullmatch(tag)
    if match is None or match["name"] not in _EXPORTERS:
        raise ArchnetError(
            f"unknown ONNX exporter {tag!r}; use '<exporter>/opset<N>' with exporter one of: "
            + ", ".join(_EXPORTERS)
        )
    return match["name"], int(match["opset"])


def export_chain(opset: int = 17) -> list[str]:
    """Exporter tags ``export_onnx`` tries in order at ``opset``; the first that works is used.

    TorchScript first while the installed torch still ships it (it is fast), then dynamo at the
    same opset, then dynamo at the oldest opset it emits natively (its version converter fails
    on some graphs). Part of the latency cache key: a new torch can change this order.
    """
    names = ["torchscript", "dynamo"] if legacy_exporter_available() else ["dynamo"]
    tags = [_tag(name, opset) for name in names]
    if opset < _DYNAMO_MIN_OPSET:
        tags.append(_tag("dynamo", _DYNAMO_MIN_OPSET))
    return tags


def common_exporter(tags: Iterable[str]) -> str:
    """The exporter a group of modules exported with ``tags`` falls back to together.

    The latest exporter in fallback order at the highest opset any member needed: every member
    whose export fell back got there because the earlier choice failed for it.
    """
    parsed = [_parse_tag(tag) for tag in tags]
    if not parsed:
        raise ArchnetError("no exporter tags to choose a common exporter from")
    order = list(_EXPORTERS)
    name = max((n for n, _ in parsed), key=order.index)
    return _tag(name, max(opset for _, opset in parsed))


def uniform_exporters(tags: Iterable[str]) -> list[str]:
    """Exporters to try, in order, for re-exporting a whole group with one of them.

    ``common_exporter`` first, then the fallbacks after it in ``export_chain``: a member that
    exported fine with its first choice may still fail with the common one (an identity graph
    fails dynamo's conversion to opset 17, for one).
    """
    tags = list(tags)
    common = common_exporter(tags)
    chain = export_chain(min(_parse_tag(tag)[1] for tag in tags))
    later = chain[chain.index(common) + 1 :] if common in chain else []
    return [common, *later]


def _default_opset(model: onnx.ModelProto) -> int:
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)


def exporter_of(model: onnx.ModelProto) -> str | None:
    """The tag ``export_onnx`` stamped on ``model`` (e.g. ``"dynamo/opset18"``), else None."""
    return next((p.value for p in model.metadata_props if p.key == EXPORTER_KEY), None)


def stamp_exporter(model: onnx.ModelProto, tag: str | None) -> None:
    """Record ``tag`` in ``model``'s metadata (replacing an older one); None leaves it as is.

    For code that rebuilds a model's metadata after ``export_onnx`` (e.g. the QDQ rewrite).
    """
    if tag is None:
        return
    for prop in model.metadata_props:
        if prop.key == EXPORTER_KEY:
            prop.value = tag
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = EXPORTER_KEY, tag


def export_onnx(
    module: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    path: str | Path | None = None,
    opset: int = 17,
    exporter: str | None = None,
    *,
    args: tuple[torch.Tensor, ...] | None = None,
    names: OnnxIO | None = None,
) -> onnx.ModelProto:
    """Export ``module`` at a fixed input shape (with batch) and check the result.

    A fixed shape is used on purpose: latency is measured at each block's real input shape,
    and static shapes let the runtime pick its fastest kernels. The exporters of
    ``export_chain(opset)`` are tried in turn; ``exporter`` (a tag such as
    ``"dynamo/opset18"``) uses that one only, so modules timed together can be exported
    alike. The tag of the exporter used and the opset it emitted is stored in the model's
    metadata under ``EXPORTER_KEY`` (read it with ``exporter_of``).

    A module with several inputs, or with integer ones (token ids), is exported from the
    example tensors ``args`` instead of a random input of ``input_shape``; ``names`` then
    names its inputs and outputs and may declare dynamic axes (the default is one ``input``
    and one ``output``, all shapes fixed).
    """
    if (args is None) == (input_shape is None):
        raise ArchnetError("export_onnx takes either an input_shape or example args, not both")
    names = names or _ONE_IO
    chain = [exporter] if exporter is not None else export_chain(opset)
    steps = [_parse_tag(tag) for tag in chain]
    cpu_module = module if _device(module).type == "cpu" else copy.deepcopy(module).cpu()
    if args is None:
        x: torch.Tensor | tuple[torch.Tensor, ...] = sample_input(cpu_module, input_shape)
    else:
        x = tuple(a.detach().cpu() for a in args)
    extra = () if names == _ONE_IO else (names,)
    errors: list[str] = []
    model: onnx.ModelProto | None = None
    with eval_mode(cpu_module), _quiet(), torch.no_grad():
        for name, version in steps:
            try:
                model = _EXPORTERS[name](cpu_module, x, version, *extra)
                break
            except Exception as exc:  # reported together below
                errors.append(f"{_tag(name, version)}: {type(exc).__name__}: {exc}")
    if model is None:
        raise RuntimeError(f"ONNX export of {type(module).__name__} failed ({'; '.join(errors)})")
    onnx.checker.check_model(model)
    stamp_exporter(model, _tag(name, _default_opset(model)))
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
