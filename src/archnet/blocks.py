"""Find a teacher's blocks, record their shapes, and cache their input/output features.

A *block* is a submodule (by qualified name) that maps one tensor to one tensor and is
called once per forward. The pipeline replaces blocks one at a time, so everything else
(stem, head, glue) stays the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from rich.progress import Progress
from torch import nn

from archnet.errors import ArchnetError


@dataclass(frozen=True)
class BlockSpec:
    """Shapes of one teacher block, without the batch dimension: (C, H, W) for CNNs."""

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def in_ch(self) -> int:
        return self.in_shape[0]

    @property
    def out_ch(self) -> int:
        return self.out_shape[0]

    @property
    def stride(self) -> int:
        """Spatial down-sampling factor, 0 when the block does not shrink by an integer factor."""
        if len(self.in_shape) < 3:
            return 1
        h_in, h_out = self.in_shape[1], self.out_shape[1]
        if h_out == 0 or h_in % h_out or self.in_shape[2] != self.out_shape[2] * (h_in // h_out):
            return 0
        return h_in // h_out

    @property
    def same_shape(self) -> bool:
        return self.in_shape == self.out_shape


# Block patterns of common families, tried in order. A pattern is dot-aware: each segment is
# an fnmatch pattern and the segment count must match, so "blocks.*" never matches "blocks.0.conv".
FAMILY_PATTERNS: dict[str, str] = {
    "resnet": "layer*.*",  # timm ResNet / ResNeSt / ResNeXt, torchvision ResNet
    "efficientnet": "blocks.*.*",  # timm EfficientNet / MobileNetV2-V3 / MnasNet
    "convnext": "stages.*.blocks.*",  # timm ConvNeXt
    "regnet": "s[0-9].b[0-9]*",  # timm RegNet
    "stages": "stages.*.*",  # other staged timm models
    "blocks": "blocks.*",  # flat block lists (ViT-style, the archnet zoo)
    "features": "features.*",  # torchvision MobileNet / VGG-style
    "sequential": "*",  # a plain nn.Sequential: its top-level children
}


def match_name(name: str, pattern: str) -> bool:
    """Dot-aware glob: ``layer*.*`` matches ``layer1.0`` but not ``layer1.0.conv1``."""
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatch(p, q) for p, q in zip(parts, pats, strict=False))


def _is_container(module: nn.Module) -> bool:
    """A block is a composite of layers, never a single conv/BN/activation."""
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def _candidate_names(model: nn.Module, patterns: list[str], containers_only: bool) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not name or not any(match_name(name, p) for p in patterns):
            continue
        if containers_only and not _is_container(module):
            return []  # a pattern that reaches single layers is at the wrong depth
        if any(True for _ in module.parameters()):
            names.append(name)
    # drop names nested inside another match: a block is never inside another block
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def trace_blocks(model: nn.Module, names: list[str], example: torch.Tensor) -> list[BlockSpec]:
    """Run one forward with hooks; keep blocks called once with one tensor in and one out."""
    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {n: [] for n in names}
    order: list[str] = []
    bad: dict[str, str] = {}

    def hook(name: str):
        def fn(_m, args, out):
            tensors_in = [a for a in args if isinstance(a, torch.Tensor)]
            if len(args) != 1 or len(tensors_in) != 1 or not isinstance(out, torch.Tensor):
                bad[name] = "does not map one tensor to one tensor"
                return
            calls[name].append((tuple(args[0].shape[1:]), tuple(out.shape[1:])))
            order.append(name)

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:  # the user's model: any type
        shape = tuple(example.shape)
        raise ArchnetError(
            f"the model fails on an input of shape {shape} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); pass --input-size C,H,W the model accepts"
        ) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    specs = []
    for name in dict.fromkeys(order):
        if name in bad or len(calls[name]) != 1:
            continue
        (in_shape, out_shape) = calls[name][0]
        specs.append(BlockSpec(name, in_shape, out_shape))
    return specs


def find_blocks(
    model: nn.Module, input_shape: tuple[int, ...], patterns: str | list[str] | None = None
) -> list[BlockSpec]:
    """The teacher's blocks in call order: from ``patterns`` (comma-separated globs) or detected.

    Detection tries the families in :data:`FAMILY_PATTERNS` and takes the first that yields at
    least two blocks at container depth.
    """
    example = torch.randn(2, *input_shape)
    if patterns:
        pats = [p.strip() for p in patterns.split(",")] if isinstance(patterns, str) else patterns
        names = _candidate_names(model, pats, containers_only=False)
        specs = trace_blocks(model, names, example) if names else []
        if not specs:
            raise ArchnetError(
                f"--blocks {','.join(pats)!r} matches no module that maps one tensor to one "
                f"tensor; list the model's module names with `print(model)` and pass a pattern "
                "such as 'layer*.*'"
            )
        return specs
    for pattern in FAMILY_PATTERNS.values():
        names = _candidate_names(model, [pattern], containers_only=True)
        if pattern == "*" and not isinstance(model, nn.Sequential):
            continue
        if len(names) < 2:
            continue
        specs = trace_blocks(model, names, example)
        if len(specs) >= 2:
            return specs
    raise ArchnetError(
        f"no recognisable blocks in {type(model).__name__}; pass --blocks 'PATTERN' naming the "
        "block modules (e.g. 'layer*.*' or 'blocks.*')"
    )


class FeatureCache:
    """Teacher block inputs/outputs on disk as fp16 ``.npy`` files, read back memory-mapped.

    Written once per run (``features/<split>/<index>_{in,out}.npy`` and ``logits.npy``), so
    every candidate job reads the same tensors without re-running the teacher.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, split: str, key: str) -> Path:
        return self.root / split / f"{key}.npy"

    def exists(self, split: str, n_blocks: int) -> bool:
        return self.path(split, "logits").exists() and all(
            self.path(split, f"{i:03d}_{k}").exists()
            for i in range(n_blocks)
            for k in ("in", "out")
        )

    def write(
        self,
        model: nn.Module,
        specs: list[BlockSpec],
        images: torch.Tensor,
        split: str,
        batch_size: int = 128,
        progress: Progress | None = None,
    ) -> None:
        """Run the teacher over ``images`` once, hooking every block."""
        n = len(images)
        if n == 0:
            raise ArchnetError(f"no images to compute teacher features for ({split} split)")
        out_dir = self.root / split
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = {}
        for i, s in enumerate(specs):
            for kind, shape in (("in", s.in_shape), ("out", s.out_shape)):
                tmp[(i, kind)] = open_memmap(
                    out_dir / f"{i:03d}_{kind}.tmp.npy", "w+", np.float16, (n, *shape)
                )
        logits = None
        cursor = [0]

        def store(i: int, kind: str, t: torch.Tensor) -> None:
            lo = cursor[0]
            tmp[(i, kind)][lo : lo + len(t)] = t.detach().to(torch.float16).numpy()

        # the input is copied before the block runs: a block may modify it in place
        handles = []
        for i, s in enumerate(specs):
            block = model.get_submodule(s.name)
            handles.append(
                block.register_forward_pre_hook(lambda _m, args, i=i: store(i, "in", args[0]))
            )
            handles.append(
                block.register_forward_hook(lambda _m, _args, out, i=i: store(i, "out", out))
            )
        task = progress.add_task(f"teacher features ({split})", total=n) if progress else None
        try:
            model.eval()
            with torch.no_grad():
                for lo in range(0, n, batch_size):
                    cursor[0] = lo
                    y = model(images[lo : lo + batch_size])
                    if logits is None:
                        logits = open_memmap(
                            out_dir / "logits.tmp.npy", "w+", np.float32, (n, *y.shape[1:])
                        )
                    logits[lo : lo + len(y)] = y.numpy()
                    if progress:
                        progress.update(task, advance=len(y))
        finally:
            for h in handles:
                h.remove()
        # rename only when complete, so an interrupted run never reads half a cache
        for (i, kind), arr in tmp.items():
            arr.flush()
            del arr
            (out_dir / f"{i:03d}_{kind}.tmp.npy").replace(self.path(split, f"{i:03d}_{kind}"))
        logits.flush()
        (out_dir / "logits.tmp.npy").replace(self.path(split, "logits"))

    def problem(
        self, splits: tuple[str, ...], specs: list[BlockSpec], sizes: dict[str, int]
    ) -> str | None:
        """Why the cache cannot serve ``specs`` on ``splits`` (a file missing, truncated or of
        the wrong shape), or None when every file is whole."""
        for split in splits:
            n = sizes[split]
            expected: dict[str, tuple[int, ...] | None] = {"logits": None}
            for i, s in enumerate(specs):
                expected[f"{i:03d}_in"] = (n, *s.in_shape)
                expected[f"{i:03d}_out"] = (n, *s.out_shape)
            for key, shape in expected.items():
                path = self.path(split, key)
                try:
                    arr = self.load(split, key)
                except FileNotFoundError:
                    return f"{path} is missing"
                except (OSError, ValueError) as e:
                    return f"{path} is unreadable ({type(e).__name__})"
                if arr.shape[0] != n or (shape is not None and arr.shape != shape):
                    return f"{path} holds shape {arr.shape}, expected {shape or (n, '...')}"
        return None

    def load(self, split: str, key: str) -> np.ndarray:
        return np.load(self.path(split, key), mmap_mode="r")

    def block(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, outputs) of block ``index`` as read-only memory maps."""
        return self.load(split, f"{index:03d}_in"), self.load(split, f"{index:03d}_out")
