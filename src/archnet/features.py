"""Teacher block features on disk: every block's stream input and output, and its context.

Written once per run, so every candidate job reads the same tensors without re-running the
teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from rich.progress import Progress
from torch import nn

from archnet.blocks import BlockSpec
from archnet.context import BlockContext, split_call, stream_of
from archnet.device import to_device
from archnet.errors import ArchnetError

__all__ = ["FEATURES_VERSION", "FeatureCache"]

# the layout and precision of the files; part of every candidate job's key, so a change here
# never lets a job trained on other features count as done
FEATURES_VERSION = 1


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
        device: torch.device | str = "cpu",
    ) -> None:
        """Run the teacher over ``images`` once (on ``device``; the teacher is moved there and
        back to the CPU), hooking every block: its stream input and output, and its context
        (per-sample tensors row by row, constants once)."""
        n = len(images)
        if n == 0:
            raise ArchnetError(f"no images to compute teacher features for ({split} split)")
        out_dir = self.root / split
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp: dict[tuple[int, str], np.ndarray] = {}
        for i, s in enumerate(specs):
            for kind, shape in (("in", s.in_shape), ("out", s.out_shape)):
                tmp[(i, kind)] = open_memmap(
                    out_dir / f"{i:03d}_{kind}.tmp.npy", "w+", np.float16, (n, *shape)
                )
        constants: dict[int, dict[str, Any]] = {}
        logits = None
        cursor = [0]

        def store(i: int, kind: str, t: torch.Tensor) -> None:
            lo = cursor[0]
            if (i, kind) not in tmp:  # a context tensor: its shape and type are its own
                path = out_dir / f"{i:03d}_{kind}.tmp.npy"
                dtype = t.detach().cpu().numpy().dtype
                tmp[(i, kind)] = open_memmap(path, "w+", dtype, (n, *t.shape[1:]))
            dtype = tmp[(i, kind)].dtype
            tmp[(i, kind)][lo : lo + len(t)] = t.detach().cpu().numpy().astype(dtype, copy=False)

        def keep(i: int, spec: BlockSpec, context: dict[str, Any]) -> None:
            for c in spec.context:
                if c.per_sample:
                    store(i, f"ctx_{c.name}", context[c.name])
                    continue
                seen = constants.setdefault(i, {})
                if c.name not in seen:
                    seen[c.name] = to_device(context.get(c.name), "cpu")
                elif not _same(seen[c.name], to_device(context.get(c.name), "cpu")):
                    raise ArchnetError(
                        f"block {spec.name}: its input '{c.name}' changed between batches "
                        "although it did not follow the batch size when traced"
                    )

        def pre(i: int, spec: BlockSpec):
            # the input is copied before the block runs: a block may modify it in place
            def fn(_m, args, kwargs):
                x, context = split_call(args, kwargs)
                store(i, "in", x)
                keep(i, spec, context)

            return fn

        handles = []
        for i, s in enumerate(specs):
            block = model.get_submodule(s.name)
            handles.append(block.register_forward_pre_hook(pre(i, s), with_kwargs=True))
            handles.append(
                block.register_forward_hook(
                    lambda _m, _args, out, i=i: store(i, "out", stream_of(out))
                )
            )
        task = progress.add_task(f"teacher features ({split})", total=n) if progress else None
        try:
            model.eval().to(device)
            with torch.no_grad():
                for lo in range(0, n, batch_size):
                    cursor[0] = lo
                    y = model(images[lo : lo + batch_size].to(device)).float().cpu()
                    if logits is None:
                        logits = open_memmap(
                            out_dir / "logits.tmp.npy", "w+", np.float32, (n, *y.shape[1:])
                        )
                    logits[lo : lo + len(y)] = y.numpy()
                    if progress:
                        progress.update(task, advance=len(y))
        finally:
            model.cpu()
            for h in handles:
                h.remove()
        # rename only when complete, so an interrupted run never reads half a cache
        for i, values in constants.items():
            torch.save(values, out_dir / f"{i:03d}_ctx.tmp.pt")
            (out_dir / f"{i:03d}_ctx.tmp.pt").replace(out_dir / f"{i:03d}_ctx.pt")
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
                expected.update({f"{i:03d}_ctx_{c.name}": None for c in s.context if c.per_sample})
                constant = any(not c.per_sample for c in s.context)
                if constant and not (self.root / split / f"{i:03d}_ctx.pt").exists():
                    return f"{self.root / split / f'{i:03d}_ctx.pt'} is missing"
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

    def context(self, split: str, index: int, spec: BlockSpec) -> BlockContext:
        """The context block ``index`` was called with over ``split`` (empty for most CNNs)."""
        file = self.root / split / f"{index:03d}_ctx.pt"
        constants = torch.load(file, weights_only=False) if file.exists() else {}
        rows = {
            c.name: self.load(split, f"{index:03d}_ctx_{c.name}")
            for c in spec.context
            if c.per_sample
        }
        return BlockContext(constants, rows)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return type(a) is type(b) and a == b
