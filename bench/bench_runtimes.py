"""Do quantized students run faster where they deploy? FP32, archnet's W8A8 QDQ export (with
its integer quantization points, and with layer inputs alone) and onnxruntime's own static PTQ
(QDQ, U8S8) of the same network, timed on onnxruntime and on OpenVINO (CPU, 1 thread,
interleaved in one run per runtime; medians).

Latency does not depend on the weights, so the networks are timm models with random weights
and the W8A8 student is calibrated, not trained.

    python bench/bench_runtimes.py
    python bench/bench_runtimes.py --models resnet18 --size 224 --threads 4
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
from rich.console import Console
from rich.table import Table

from archnet.quant import QuantConfig, prepare_qat
from archnet.quant.ptq import ptq_onnxruntime
from archnet.targets import get_backend

MODELS = ["resnet18", "efficientnet_b0"]
RUNTIMES = ["onnxruntime", "openvino"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    shape = (1, 3, a.size, a.size)
    table = Table(title=f"FP32 vs W8A8 at {a.size}x{a.size}, {a.threads} thread(s), ms (median)")
    cols = ("model", "runtime", "FP32", "archnet W8A8", "inputs only", "ORT PTQ W8A8")
    for col in (*cols, "archnet x", "PTQ x", "archnet / PTQ"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for name in a.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
        calib = torch.randn(16, *shape[1:])
        items = {"fp32": (model, shape), "ptq": (ptq_onnxruntime(model, calib, shape), shape)}
        for key, requantize in (("archnet", True), ("inputs", False)):
            cfg = QuantConfig(8, 8, (8, 8), requantize=requantize)
            items[key] = (prepare_qat(copy.deepcopy(model), cfg, calib).eval(), shape)
        for runtime in RUNTIMES:
            backend = get_backend(runtime, "cpu", a.threads)
            t = backend.measure_interleaved(items, a.rounds, warmup=5, repeats=a.repeats)
            table.add_row(
                name,
                runtime,
                *(f"{t[k]:.2f}" for k in ("fp32", "archnet", "inputs", "ptq")),
                f"{t['fp32'] / t['archnet']:.2f}x",
                f"{t['fp32'] / t['ptq']:.2f}x",
                f"{t['archnet'] / t['ptq']:.2f}",
            )
    Console().print(table)
    Console().print(
        "archnet: each tensor quantized once where produced (integer points); inputs only: "
        "layer inputs and weights alone. x: FP32 time / quantized time (above 1: faster); "
        "archnet / PTQ: below 1, archnet's export is faster than onnxruntime's own PTQ"
    )


if __name__ == "__main__":
    main()
