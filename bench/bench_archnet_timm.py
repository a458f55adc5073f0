"""Arch-Net mode on timm models (random weights, small inputs, few steps): does every student
export to ONNX with zero violations of the target, and run in onnxruntime?

    python bench/bench_archnet_timm.py
    python bench/bench_archnet_timm.py --models resnet50 --size 96
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnx
import timm
import torch
from rich.console import Console
from rich.table import Table

from archnet import ConvertConfig, convert, load_target
from archnet.onnx_utils import ort_session
from archnet.targets import check_model

MODELS = ["resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--target", default="archnet-5op")
    p.add_argument("--out", default=None, help="keep run directories here (default: temporary)")
    a = p.parse_args()
    target = load_target(a.target)
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="archnet-bench-"))
    table = Table(
        title=f"Arch-Net mode on timm models ({a.size}x{a.size}, {a.images} random "
        f"images, target {a.target})"
    )
    for col in (
        "model",
        "blocks",
        "teacher violations",
        "student violations",
        "stem/head converted",
        "ORT runs",
        "teacher ms",
        "student ms",
        "seconds",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in a.models:
        torch.manual_seed(0)
        teacher = timm.create_model(name, pretrained=False, num_classes=10).eval()
        cfg = ConvertConfig(model=f"timm:{name}", candidates="archnet_*", selection_fraction=0.25)
        cfg.blockwise.epochs, cfg.blockwise.batch_size = 1, 16
        cfg.arch.epochs_per_stage, cfg.arch.global_epochs, cfg.arch.batch_size = 0.25, 1, 16
        cfg.latency.repeats = 20
        t0 = time.perf_counter()
        images = torch.randn(a.images, 3, a.size, a.size)
        result = convert(
            teacher, images, target=a.target, budget="100", out=root / name, config=cfg, resume=True
        )
        run = result.run_dir
        student = onnx.load(str(run / "student.onnx"))
        runs = ort_session(student).run(None, {"input": images[:1].numpy()})[0].shape == (1, 10)
        rep = result.report
        table.add_row(
            name,
            str(len(rep["blocks"])),
            str(len(check_model(onnx.load(str(run / "teacher.onnx")), target))),
            str(len(check_model(student, target))),
            str(len(rep["conversions"])),
            "yes" if runs else "no",
            f"{rep['teacher']['latency_ms']:.2f}",
            f"{rep['student']['latency_ms']:.2f}",
            f"{time.perf_counter() - t0:.0f}",
        )
    Console(width=200).print(table)
    print(f"run directories: {root}")


if __name__ == "__main__":
    main()
