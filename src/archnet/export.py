"""Export teacher and student to ONNX, verify them, and time both in the same run.

A pure function of the networks and settings it is given (no run directory): it writes the
ONNX files into ``out_dir`` and returns what it measured. A quantized student is exported as
QDQ ONNX, checked against its fake-quantized PyTorch self within one output step, and timed
next to its float twin (the same network without quantizers) so the gain from integer kernels
is measured, not assumed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.costs import outside_network
from archnet.errors import ArchnetError
from archnet.onnx_utils import (
    ExportMismatchError,
    check_against_torch,
    export_onnx,
    exporter_of,
    ort_outputs,
)
from archnet.quant import (
    QuantModule,
    export_qdq,
    is_quantized,
    model_size_bits,
    onnx_bytes,
    qdq_report,
    strip_quantizers,
)
from archnet.results import ExportResult
from archnet.targets import Target, check_report
from archnet.targets.graph import Graph
from archnet.tasks import Task, decisions, get_task


def export_and_measure(
    teacher: nn.Module,
    student: nn.Module,
    specs: list[BlockSpec],
    target: Target,
    latency: Any,
    input_shape: tuple[int, ...],
    out_dir: Path,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor | None = None,
    task: Task | None = None,
) -> ExportResult:
    """Write teacher.onnx and student.onnx (plus student_fp32.onnx when quantized), check them
    against PyTorch and the target, and time them and their parts interleaved.

    ``latency`` is a :class:`archnet.config.LatencyConfig`; ``eval_images`` check the export
    and, for a quantized student, measure it as the runtime deploys it (through ``task``'s
    outputs and metrics; image classification by default).
    """
    task = task or get_task("classification")
    x = _batch(eval_images, input_shape[0])
    quantized = is_quantized(student)
    networks = {"teacher": teacher, "student": student}
    if quantized:
        networks["student_fp32"] = strip_quantizers(copy.deepcopy(student))
        step = output_step(student)
    protos, diffs = {}, {}
    for name, model in networks.items():
        path = out_dir / f"{name}.onnx"
        q = name == "student" and quantized
        proto = export_qdq(model, input_shape, path) if q else export_onnx(model, input_shape, path)
        protos[name] = proto
        # A QDQ graph, run as written, must agree within one step at the output; a float
        # one to rounding. (The runtime's fused integer kernels round on their own; that
        # drift is measured below, as the deployed model's accuracy.)
        tol = {"rtol": 0.0, "atol": step, "optimize": False} if q else {"rtol": 1e-3, "atol": 1e-3}
        try:
            diffs[name] = check_against_torch(model, proto, x, **tol)
        except ExportMismatchError as e:
            raise ArchnetError(f"{name}.onnx disagrees with PyTorch: {e}") from None
    report = check_report(protos["student"], target)
    if not report.passed():
        listed = "; ".join(str(v) for v in (*report.violations, *report.unverified)[:5])
        raise ArchnetError(
            f"student.onnx fails the check against target {target.name} "
            f"({len(report.violations)} violations, {len(report.unverified)} unverified): {listed}"
        )
    backend = target.latency_backend()
    items = timing_items({"teacher": teacher, "student": student}, specs, input_shape)
    if quantized:
        items["student_fp32"] = (networks["student_fp32"], input_shape)
    times = backend.measure_interleaved(
        items, rounds=latency.rounds, warmup=latency.warmup, repeats=latency.repeats
    )
    quantization = None
    if quantized:
        quantization = {
            **deployed_agreement(task, student, protos["student"], eval_images, eval_labels),
            "output_step": step,
            "tensors": qdq_report(protos["student"]),
            "size_bits": model_size_bits(student),
            "fp32_size_bits": model_size_bits(networks["student_fp32"]),
        }
    return ExportResult(
        input_shape=list(input_shape),
        max_abs_diff=diffs,
        ops={
            n: sorted({node.op_type for node in Graph(p).kept_nodes()}) for n, p in protos.items()
        },
        check={"violations": len(report.violations), "unverified": len(report.unverified)},
        exporters={
            **{f"{n}.onnx": exporter_of(p) or "unknown" for n, p in protos.items()},
            "timed": times.exporter,
        },
        backend=backend.name,
        device=backend.device,
        threads=backend.threads,
        ms={n: times[n] for n in networks},
        sum_of_parts_ms={n: sum_of_parts(times, n, specs) for n in ("teacher", "student")},
        sizes={n: _sizes(out_dir / f"{n}.onnx") for n in networks},
        quantization=quantization,
    )


def _batch(images: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` images, repeated when there are fewer."""
    x = images[:batch]
    if len(x) < batch:
        x = x.repeat(-(-batch // len(x)), *([1] * (x.dim() - 1)))[:batch]
    return x


def _sizes(path: Path) -> dict[str, int]:
    size = onnx_bytes(path)
    return {"file_bytes": size.file_bytes, "initializer_bytes": size.initializer_bytes}


def sum_of_parts(times: dict[str, float], name: str, specs: list[BlockSpec]) -> float:
    """A network's outside parts plus each block above its call floor, from one timing run."""
    return times[f"{name}/outside"] + sum(
        max(times[f"{name}/{s.name}"] - times[f"floor/{s.in_shape}"], 0.0) for s in specs
    )


def timing_items(
    networks: dict[str, nn.Module], specs: list[BlockSpec], shape: tuple[int, ...]
) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Whole networks, and each one's parts as the latency model adds them, to time together.

    Timing the parts in the same interleaved run as the wholes tests the additive latency
    model itself, free of the drift between the latency stage and now.
    """
    batch = shape[0]
    items: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    for name, net in networks.items():
        items[name] = (net, shape)
        items[f"{name}/outside"] = (outside_network(net, specs), shape)
        for s in specs:
            items[f"{name}/{s.name}"] = (net.get_submodule(s.name), (batch, *s.in_shape))
    for s in specs:
        items[f"floor/{s.in_shape}"] = (nn.Identity(), (batch, *s.in_shape))
    return items


def deployed_agreement(
    task: Task,
    student: nn.Module,
    proto: onnx.ModelProto,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
) -> dict[str, Any]:
    """The QDQ student as onnxruntime deploys it (all graph optimisations, integer kernels)
    against its PyTorch self: output drift, the task's decision agreement (same class, same
    label decisions), and top-1 where labelled and the task has it."""
    expected = task.outputs(student, inputs)
    got = torch.from_numpy(ort_outputs(proto, inputs))
    words, share = decisions(task.agreement(got, expected))
    out: dict[str, Any] = {
        "runtime_max_abs_diff": float((got - expected).abs().max()),
        "runtime_agreement": {"what": words, "share": share},
        "runtime_top1": None,
    }
    if targets is not None:
        out["runtime_top1"] = task.metrics(got, targets).get("top1")
    return out


def output_step(model: nn.Module) -> float:
    """One quantization step at the output of the model's last quantized layer.

    The last layer's input step times its largest absolute weight row sum: how far its output
    can move when every input value moves by one step: the tolerance for the runtime's
    integer rounding.
    """
    last = [m for m in model.modules() if isinstance(m, QuantModule)][-1]
    weight = last.weight_quant(last.weight).detach().flatten(1)
    return float(last.act_quant.step.detach().max()) * float(weight.abs().sum(1).max())
