"""Export teacher and student to ONNX, verify them, and time both in the same run.

A quantized student is exported as QDQ ONNX, checked against its fake-quantized PyTorch self
within one output step, and timed next to its float twin (the same network without
quantizers) so the gain from integer kernels is measured, not assumed.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from archnet.costs import outside_network
from archnet.errors import ArchnetError
from archnet.onnx_utils import (
    ExportMismatchError,
    check_against_torch,
    export_onnx,
    ort_outputs,
)
from archnet.quant import (
    QuantModule,
    export_qdq,
    is_quantized,
    model_size_bits,
    qdq_report,
    strip_quantizers,
)
from archnet.targets.opset import check_model

if TYPE_CHECKING:
    from archnet.pipeline import Run


def export_and_measure(run: Run, teacher: nn.Module, student: nn.Module) -> dict[str, Any]:
    """Write teacher.onnx and student.onnx, check them, and measure both interleaved."""
    shape = (run.batch_size, *run.config.input_size)
    x = run.images("heldout")[: shape[0]]
    if len(x) < shape[0]:
        x = x.repeat(-(-shape[0] // len(x)), *([1] * (x.dim() - 1)))[: shape[0]]
    out: dict[str, Any] = {"input_shape": list(shape)}
    protos = {}
    quantized = is_quantized(student)
    networks = {"teacher": teacher, "student": student}
    if quantized:
        networks["student_fp32"] = strip_quantizers(copy.deepcopy(student))
        step = output_step(student)
    for name, model in networks.items():
        path = run.path(f"{name}.onnx")
        q = name == "student" and quantized
        proto = export_qdq(model, shape, path) if q else export_onnx(model, shape, path)
        protos[name] = proto
        # A QDQ graph, run as written, must agree within one step at the output; a float
        # one to rounding. (The runtime's fused integer kernels round on their own; that
        # drift is measured below, as the deployed model's accuracy.)
        tol = {"rtol": 0.0, "atol": step, "optimize": False} if q else {"rtol": 1e-3, "atol": 1e-3}
        try:
            out[f"{name}_max_abs_diff"] = check_against_torch(model, proto, x, **tol)
        except ExportMismatchError as e:
            raise ArchnetError(f"{name}.onnx disagrees with PyTorch: {e}") from None
        out[f"{name}_ops"] = sorted({n.op_type for n in proto.graph.node})
    if quantized:
        out["quantization"] = {
            **_deployed_agreement(run, student, protos["student"]),
            "output_step": step,
            "tensors": qdq_report(protos["student"]),
            "size_bits": model_size_bits(student),
            "fp32_size_bits": model_size_bits(networks["student_fp32"]),
            "teacher_size_bits": model_size_bits(teacher),
        }
    violations = check_model(protos["student"], run.target)
    if violations:
        listed = "; ".join(str(v) for v in violations[:5])
        raise ArchnetError(
            f"student.onnx violates target {run.target.name} ({len(violations)} nodes): {listed}"
        )
    out["student_violations"] = 0
    backend = run.target.latency_backend()
    cfg = run.config.latency
    items = _timing_items(run, {"teacher": teacher, "student": student}, shape)
    if quantized:
        items["student_fp32"] = (networks["student_fp32"], shape)
    times = backend.measure_interleaved(
        items,
        rounds=cfg.rounds,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
    )
    out.update(
        {
            "backend": backend.name,
            "device": backend.device,
            "threads": backend.threads,
            "teacher_ms": times["teacher"],
            "student_ms": times["student"],
            "speedup": times["teacher"] / times["student"],
        }
    )
    if quantized:
        out["student_fp32_ms"] = times["student_fp32"]
        out["quantized_speedup"] = times["student_fp32"] / times["student"]
    for name in ("teacher", "student"):
        out[f"{name}_sum_of_parts_ms"] = times[f"{name}/outside"] + sum(
            max(times[f"{name}/{s.name}"] - times[f"floor/{s.in_shape}"], 0.0) for s in run.specs
        )
    return out


def _timing_items(
    run: Run, networks: dict[str, nn.Module], shape: tuple[int, ...]
) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Whole networks, and each one's parts as the latency model adds them, to time together.

    Timing the parts in the same interleaved run as the wholes tests the additive latency
    model itself, free of the drift between the latency stage and now.
    """
    batch = shape[0]
    items: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    for name, net in networks.items():
        items[name] = (net, shape)
        items[f"{name}/outside"] = (outside_network(net, run.specs), shape)
        for s in run.specs:
            items[f"{name}/{s.name}"] = (net.get_submodule(s.name), (batch, *s.in_shape))
    for s in run.specs:
        items[f"floor/{s.in_shape}"] = (nn.Identity(), (batch, *s.in_shape))
    return items


def _deployed_agreement(run: Run, student: nn.Module, proto: onnx.ModelProto) -> dict[str, Any]:
    """The QDQ student as onnxruntime deploys it (all graph optimisations, integer kernels)
    against its PyTorch self: output drift and argmax agreement on held-out data, and top-1
    where labels exist."""
    heldout = run.images("heldout")
    with torch.no_grad():
        expected = student.eval()(heldout).numpy()
    got = ort_outputs(proto, heldout)
    out = {
        "runtime_max_abs_diff": float(np.abs(got - expected).max()),
        "runtime_argmax_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
    }
    labels = run.data.get("eval_labels")
    if labels is not None:
        pred = ort_outputs(proto, run.images("eval")).argmax(1)
        out["runtime_top1"] = float((pred == labels.numpy()).mean() * 100)
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
