"""``archnet demo``: train the small teacher on digits, convert it at half its latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from archnet.api import start
from archnet.config import ConvertConfig
from archnet.stages.common import console

# one or two of every kind of change: skip, depthwise-separable, MBConv with and without SE,
# fused MBConv, a plain residual 3x3 block; ReLU where the teacher used SiLU
DEMO_CANDIDATES = (
    "skip",
    "skip_pool",
    "dwsep_k3_relu",
    "dwsep_k5_relu",
    "mbconv_k3_e3_relu",
    "mbconv_k3_e3_se_relu",
    "fused_k3_e1_relu",
    "resnet_basic_w05",
)


# quantized: every choice is trained twice (float, then quantized), so a shorter list
QUANT_CANDIDATES = ("skip", "mbconv_k3_e3_se_relu", "mbconv_k3_e3_relu", "fused_k3_e1_relu")

# Arch-Net mode: only candidates built from the restricted operators (others would be rejected
# by the target check anyway), plus skipping a block where shapes allow
ARCHNET_CANDIDATES = ("archnet_*", "skip")


def demo_config(
    fast: bool = False, target: str = "cpu-ort", bits: str | None = None
) -> ConvertConfig:
    """Settings sized so the whole demo fits in a few minutes on two CPU cores."""
    archnet = target.startswith("archnet-5op")
    cfg = ConvertConfig(
        model="zoo:tiny_effnet",
        data="digits",
        target=target,
        # onnxruntime's CPU integer kernels are slower than its float ones on a network this
        # small (the report shows by how much), so a quantized demo would only meet a latency
        # budget by skipping blocks; it is shown without one binding, to measure what
        # quantization costs in accuracy
        budget="1.0" if archnet else "4.0" if bits else "0.5",
        bits=bits,
        candidates=",".join(
            ARCHNET_CANDIDATES if archnet else QUANT_CANDIDATES if bits else DEMO_CANDIDATES
        ),
        ablation=archnet,
    )
    cfg.arch.epochs_per_stage = 0.25 if fast else 1.0
    cfg.arch.global_epochs = 1 if fast else 6
    cfg.blockwise.epochs = 1 if fast else 3
    cfg.blockwise.quant_epochs = 1 if fast else 4
    cfg.finetune.epochs = 1 if fast else 8
    # batch 8: on a ~1 ms network, batch-1 timings are dominated by per-call jitter
    cfg.latency.batch_size = 8
    cfg.latency.repeats = 20 if fast else 100
    return cfg


def run_demo(
    out: Path, fast: bool = False, seed: int = 0, target: str = "cpu-ort", bits: str | None = None
) -> tuple[dict[str, Any], Path]:
    """Train (or reuse) the teacher, then convert it; returns (report, run directory)."""
    from archnet.zoo import demo_teacher, evaluate

    out.mkdir(parents=True, exist_ok=True)
    teacher_file = out / "teacher_trained.pt"
    data_file = out / "digits_split.pt"
    if teacher_file.exists() and data_file.exists():
        teacher = torch.load(teacher_file, map_location="cpu", weights_only=False)
        train, heldout = torch.load(data_file, weights_only=False)
        console.print(f"[bold]teacher[/] reusing {teacher_file}")
    else:
        console.print("[bold]teacher[/] training tiny_effnet on digits (labels used only here)")
        teacher, train, heldout = demo_teacher(seed=seed, epochs=2 if fast else None, progress=True)
        torch.save(teacher, teacher_file)
        torch.save((train, heldout), data_file)
    console.print(f"  teacher held-out top-1 {evaluate(teacher, heldout):.2f}%")
    unlabeled = train.images  # the conversion never sees a label
    run_dir = out / "-".join(
        ["run", *([target] if target != "cpu-ort" else []), *([bits] if bits else [])]
    )
    cfg = demo_config(fast, target, bits)
    result = start(teacher, unlabeled, cfg, run_dir, eval_data=heldout, resume=True)
    return result.report, result.run_dir
