"""``archnet demo``: train the small teacher on Fashion-MNIST, convert it, report on its test set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from archnet.api import start
from archnet.config import ConvertConfig
from archnet.stages.common import console
from archnet.zoo.demo import DEMO_DATA, demo_recipe

# the kinds of change that pay on this network: skip, depthwise-separable 3x3 and 5x5, MBConv
# with and without SE, fused MBConv; ReLU where the teacher used SiLU. (A plain residual 3x3
# block and skip-with-pool were never chosen in trials and cost a fifth of the training time.)
DEMO_CANDIDATES = (
    "skip",
    "dwsep_k3_relu",
    "dwsep_k5_relu",
    "mbconv_k3_e3_relu",
    "mbconv_k3_e3_se_relu",
    "fused_k3_e1_relu",
)

# quantized: every choice is trained twice (float, then quantized), so a shorter list (the
# only candidate the W4A4 and W2A4 searches chose besides the teacher's own blocks)
QUANT_CANDIDATES = ("skip", "mbconv_k3_e3_se_relu")

# Arch-Net mode: only candidates built from the restricted operators (others would be rejected
# by the target check anyway), plus skipping a block where shapes allow
ARCHNET_CANDIDATES = ("archnet_*", "skip")


def demo_config(
    fast: bool = False, target: str = "cpu-ort", bits: str | None = None
) -> ConvertConfig:
    """Settings sized so the HANT demo, teacher training included, fits in ten minutes on two
    CPU cores; ``fast`` is a smoke run that proves the path, not the numbers."""
    archnet = target.startswith("archnet-5op")
    cfg = ConvertConfig(
        model="zoo:tiny_effnet",
        data=DEMO_DATA,
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
        # a third of the training images: more did not move the student in trials
        max_samples=2000 if fast else 20000,
        max_selection=500 if fast else 1000,
        proxy_images=200 if fast else 500,
    )
    if not (archnet or bits):
        # on this ~1 ms network the search table's student/teacher ratio missed the measured
        # one by up to 6% (0.474 predicted, 0.503 measured): the default 3% margin left the
        # budget met on the prediction only
        cfg.budget_margin = 0.08
    cfg.blockwise.max_samples = 1000 if fast else 5000
    cfg.blockwise.quant_epochs = 1 if fast else 4
    cfg.finetune.epochs = 1 if fast else 3 if bits else 2
    # quantized students: a larger rate moves the learned steps too far and the fine-tune
    # raised the selection KL (0.054 -> 0.14 at 1e-3, W4A4); 2e-4 halved it
    cfg.finetune.lr = 2e-4 if bits else 3e-3
    return demo_schedule(cfg, fast)


def demo_schedule(cfg: ConvertConfig, fast: bool) -> ConvertConfig:
    """What every demo shares: two blockwise epochs; no random shifts (the teacher saw none,
    and the student is judged on centred images); Arch-Net's progressive stages at a quarter
    epoch per block, then one global epoch (the CNN demo's ablation trains this schedule 12
    more times: 4 variants x 3 seeds); latency at batch 8, as batch-1 timings of a ~1 ms
    network are dominated by per-call jitter."""
    cfg.blockwise.epochs = 1 if fast else 2
    cfg.finetune.shift = cfg.arch.shift = 0
    cfg.arch.epochs_per_stage = 0.125 if fast else 0.25
    cfg.arch.global_epochs = 1
    cfg.latency.batch_size = 8
    cfg.latency.repeats = 20 if fast else 100
    return cfg


def teacher_file(out: Path, seed: int, epochs: int | None, model: str = "tiny_effnet") -> Path:
    """Where the demo teacher of this recipe and seed is cached: a changed recipe retrains."""
    recipe = {**demo_recipe(epochs, model), "seed": seed}
    if model != "tiny_effnet":  # the first demo teacher's files keep their names
        recipe["model"] = model
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return out / f"teacher-{digest}.pt"


def demo_teacher_cached(
    out: Path, seed: int = 0, epochs: int | None = None, model: str = "tiny_effnet"
) -> torch.nn.Module:
    """A demo teacher, trained once per model, recipe and seed and reused by every later demo."""
    from archnet.zoo import demo_teacher

    file = teacher_file(out, seed, epochs, model)
    if file.exists():
        console.print(f"[bold]teacher[/] reusing {file}")
        return torch.load(file, map_location="cpu", weights_only=False).eval()
    console.print(f"[bold]teacher[/] training {model} on Fashion-MNIST (labels used only here)")
    teacher, _, _ = demo_teacher(seed=seed, epochs=epochs, progress=True, model=model)
    out.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save(teacher, tmp)
    tmp.replace(file)
    return teacher


def run_demo(
    out: Path, fast: bool = False, seed: int = 0, target: str = "cpu-ort", bits: str | None = None
) -> tuple[dict[str, Any], Path]:
    """Train (or reuse) the teacher, then convert it; returns (report, run directory).

    The conversion reads the training images without their labels and reports on the 10,000
    test images, which no choice is made on."""
    teacher = demo_teacher_cached(out, seed, epochs=1 if fast else None)
    run_dir = out / "-".join(
        [
            "run",
            *([target] if target != "cpu-ort" else []),
            *([bits] if bits else []),
            *(["fast"] if fast else []),
        ]
    )
    cfg = demo_config(fast, target, bits)
    cfg.seed = seed
    result = start(teacher, DEMO_DATA, cfg, run_dir, resume=True)
    return result.report, result.run_dir
