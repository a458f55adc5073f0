"""Per-candidate costs for the search: latency on the target, parameters and MACs.

Latencies are additive by construction: every measurement has the backend's per-call floor
(the time of an empty graph at that input shape) subtracted, and the parts outside the blocks
(stem, head, glue) are timed as the teacher with every block replaced by a near-free stub. The
predicted network latency is then outside + sum(chosen blocks), which the export stage checks
against the measured whole network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.choices import build_choice
from archnet.flops import count_macs, count_params
from archnet.quant import model_size_bits
from archnet.targets import LatencyCache
from archnet.targets.latency import LatencyBackend, measure_cached_group


class BlockStub(nn.Module):
    """Stands in for a block when timing the rest of the network.

    Its output depends on its input through one element, so no compiler can prune the stem
    that feeds it, while its own cost (one slice, one broadcast add) is negligible.
    """

    def __init__(self, out_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("const", torch.zeros(1, *out_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = x.flatten(1)[:, :1].reshape(-1, *([1] * (self.const.dim() - 1)))
        return self.const + probe * 0.0


def outside_network(teacher: nn.Module, specs: list[BlockSpec]) -> nn.Module:
    """The teacher with every block stubbed out: what the network costs besides its blocks."""
    import copy

    shell = copy.deepcopy(teacher)
    for s in specs:
        shell.set_submodule(s.name, BlockStub(s.out_shape))
    return shell.eval()


def block_latency_table(
    backend: LatencyBackend,
    cache: LatencyCache,
    teacher: nn.Module,
    specs: list[BlockSpec],
    pools: dict[str, Any],
    input_shape: tuple[int, ...],
    cfg: Any,
    on_done: Callable[[], None] = lambda: None,
    shell: nn.Module | None = None,
    quantize_outside: Callable[[nn.Module, torch.Tensor], nn.Module] | None = None,
) -> dict[str, Any]:
    """Measure every pooled choice (cached), the outside parts and the whole teacher.

    ``shell`` is the network the student's blocks will sit in when it differs from the teacher
    (Arch-Net mode converts the stem and head); its outside parts are the search's offset,
    while the teacher's own outside parts stay the reference. ``quantize_outside`` quantizes
    those parts as a quantized student will have them.
    """
    kw = {"warmup": cfg.warmup, "repeats": cfg.repeats}
    batch = input_shape[0]
    floors: dict[str, float] = {}
    hits = 0
    blocks: dict[str, dict[str, float]] = {}
    teacher_blocks: dict[str, float] = {}
    for spec in specs:
        shape = (batch, *spec.in_shape)
        wanted = pools[spec.name]["choices"]  # the target's rejections are already gone
        # the teacher's block is always timed: it is the reference even where not allowed
        block = teacher.get_submodule(spec.name)
        pool = {
            name: build_choice(name, spec, block) for name in dict.fromkeys(["teacher", *wanted])
        }
        net, floor, hit = measure_cached_group(backend, cache, pool, shape, cfg.rounds, **kw)
        hits += hit
        floors["x".join(map(str, shape))] = floor
        teacher_blocks[spec.name] = net["teacher"]
        blocks[spec.name] = {name: ms for name, ms in net.items() if name in wanted}
        for _ in pool:
            on_done()
    items = {
        "teacher_outside": (outside_network(teacher, specs), input_shape),
        "teacher": (teacher, input_shape),
    }
    outside = outside_network(shell if shell is not None else teacher, specs)
    if quantize_outside is not None:
        quantize_outside(outside, torch.randn(2, *input_shape[1:]))
    if shell is not None or quantize_outside is not None:
        items["outside"] = (outside, input_shape)
    wholes = backend.measure_interleaved(items, rounds=cfg.rounds, **kw)
    outside_ms = wholes.get("outside", wholes["teacher_outside"])
    teacher_ms = wholes["teacher"]
    on_done()
    on_done()
    predicted = wholes["teacher_outside"] + sum(teacher_blocks.values())
    teacher_macs = count_macs(teacher, input_shape[1:])
    base = shell if shell is not None else teacher
    base_params = count_params(base) - sum(count_params(base.get_submodule(s.name)) for s in specs)
    base_macs = count_macs(base, input_shape[1:]) - sum(
        count_macs(base.get_submodule(s.name), s.in_shape) for s in specs
    )
    return {
        "backend": backend.name,
        "device": backend.device,
        "threads": backend.threads,
        "batch_size": batch,
        "input_shape": list(input_shape),
        "blocks": blocks,
        "teacher_blocks": teacher_blocks,
        "outside_ms": outside_ms,
        "teacher_outside_ms": wholes["teacher_outside"],
        "overhead_ms": floors,
        "teacher_ms": teacher_ms,
        "teacher_predicted_ms": predicted,
        "teacher_params": count_params(teacher),
        "teacher_macs": teacher_macs,
        "outside_params": base_params,
        "outside_macs": base_macs,
        "outside_size_bits": model_size_bits(outside)
        - sum(model_size_bits(m) for m in outside.modules() if isinstance(m, BlockStub)),
        "teacher_size_bits": model_size_bits(teacher),
        "cache_hits": hits,
    }
