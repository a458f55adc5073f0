"""Convert timm models end to end (random weights, small inputs, few steps) and print a table.

This measures the pipeline, not accuracy: the teachers are untrained. For each model it prints
the candidate pool size, the search-space size, the time of every stage, and the teacher /
student latency ratio measured in the same run on the target backend.

    python bench/bench_timm.py                      # efficientnet_b0 and resnet50
    python bench/bench_timm.py --models resnet18 --size 96 --budget 0.4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table

from archnet import ConvertConfig, convert
from archnet.stages import NAMES


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency random images: closer to natural image statistics than white noise."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(n, 3, max(size // 8, 2), max(size // 8, 2), generator=g)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["efficientnet_b0", "resnet50"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--budget", default="0.5")
    p.add_argument("--target", default="cpu-ort")
    p.add_argument("--out", default=None, help="keep run directories here (default: temporary)")
    a = p.parse_args()

    stage_names = [n for n in NAMES if n not in ("prepare", "ablation", "report")]
    table = Table(
        title=f"archnet end to end on timm models ({a.size}x{a.size}, {a.images} "
        f"random images, budget {a.budget}, target {a.target})"
    )
    for col in [
        "model",
        "blocks",
        "pool",
        "space",
        *stage_names,
        "teacher ms",
        "student ms",
        "speedup",
        "pred. err",
    ]:
        table.add_column(col, justify="left" if col == "model" else "right")
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="archnet-bench-"))
    for name in a.models:
        torch.manual_seed(0)
        teacher = timm.create_model(name, pretrained=False, num_classes=10).eval()
        cfg = ConvertConfig(model=f"timm:{name}", selection_fraction=0.25)
        cfg.blockwise.epochs, cfg.blockwise.batch_size = 1, 32
        cfg.finetune.epochs, cfg.finetune.batch_size = 1, 32
        cfg.latency.repeats = 20
        result = convert(
            teacher,
            smooth_images(a.images, a.size),
            target=a.target,
            budget=a.budget,
            out=root / name,
            config=cfg,
            resume=True,
        )
        rep = result.report
        secs = rep["stage_seconds"]
        table.add_row(
            name,
            str(len(rep["blocks"])),
            str(rep["search"]["pool_size"]),
            f"10^{rep['search']['space_log10']:.0f}",
            *[f"{secs.get(s, 0):.0f}" for s in stage_names],
            f"{rep['teacher']['latency_ms']:.2f}",
            f"{rep['student']['latency_ms']:.2f}",
            f"{rep['speedup']:.2f}x",
            f"{100 * rep['prediction_error']:.0f}%",
        )
    Console(width=220).print(table)
    print(f"run directories: {root}")


if __name__ == "__main__":
    main()
