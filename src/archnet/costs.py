"""Per-candidate costs for the search: latency on the target, parameters and MACs.

Latencies are additive by construction: every measurement has the backend's per-call floor
(the time of an empty graph at that input shape) subtracted, and the parts outside the blocks
(stem, head, glue) are timed as the teacher with every block replaced by a near-free stub. The
predicted network latency is then outside + sum(chosen blocks), which the export stage checks
against the measured whole network. Everything in the table, the outside parts and the whole
teacher included, comes from the latency cache when it was measured before, so runs pointed at
one cache file get one table and the same seed and data give the same student.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.choices import build_choice
from archnet.context import Bound, capture_context
from archnet.flops import count_macs, count_params
from archnet.quant import model_size_bits
from archnet.targets import LatencyCache
from archnet.targets.latency import LatencyBackend, measure_cached_group


class BlockStub(nn.Module):
    """Stands in for a block when timing the rest of the network.

    Its output depends on its input through one element, so no compiler can prune the stem
    that feeds it, while its own cost (one slice, one broadcast add) is negligible. It takes
    the block's context and answers in its output structure (``arity``, see ``BlockSpec``).
    """

    def __init__(self, out_shape: tuple[int, ...], arity: int = 0):
        super().__init__()
        self.register_buffer("const", torch.zeros(1, *out_shape))
        self.arity = arity

    def forward(self, x: torch.Tensor, *_args: Any, **_kwargs: Any):
        probe = x.flatten(1)[:, :1].reshape(-1, *([1] * (self.const.dim() - 1)))
        y = self.const + probe * 0.0
        return (y, *[None] * (self.arity - 1)) if self.arity else y


def outside_network(teacher: nn.Module, specs: list[BlockSpec]) -> nn.Module:
    """The teacher with every block stubbed out: what the network costs besides its blocks."""
    import copy

    shell = copy.deepcopy(teacher)
    for s in specs:
        shell.set_submodule(s.name, BlockStub(s.out_shape, s.out_arity))
    return shell.eval()


def _timed(pool: dict[str, nn.Module], context: dict[str, Any] | None) -> dict[str, nn.Module]:
    """A block's choices as they are timed: with the block's context bound, when it has one."""
    return {k: Bound(m, context) for k, m in pool.items()} if context else pool


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
    requantize: bool = True,
) -> dict[str, Any]:
    """Measure every pooled choice, the outside parts and the whole teacher, all cached.

    ``shell`` is the network the student's blocks will sit in when it differs from the teacher
    (Arch-Net mode converts the stem and head); its outside parts are the search's offset,
    while the teacher's own outside parts stay the reference. ``requantize``: the target's
    quantization points for quantized choices. ``quantize_outside`` quantizes
    those parts as a quantized student will have them. The outside parts and the teacher are
    one interleaved group with its own floor, like a block's candidates; being whole networks
    they keep that floor (``measured_ms``), while block times are above their floors.
    ``exporters`` names the exporter each number was timed from, mirroring the table.
    """
    kw = {"warmup": cfg.warmup, "repeats": cfg.repeats}
    batch = input_shape[0]
    with_context = [s.name for s in specs if s.context]
    contexts = (
        capture_context(teacher, with_context, torch.randn(*input_shape)) if with_context else {}
    )
    floors: dict[str, float] = {}
    hits = 0
    blocks: dict[str, dict[str, float]] = {}
    teacher_blocks: dict[str, float] = {}
    exporters: dict[str, Any] = {"blocks": {}, "teacher_blocks": {}}
    for spec in specs:
        shape = (batch, *spec.in_shape)
        wanted = pools[spec.name]["choices"]  # the target's rejections are already gone
        # the teacher's block is always timed: it is the reference even where not allowed
        block = teacher.get_submodule(spec.name)
        pool = {
            name: build_choice(name, spec, block, requantize=requantize)
            for name in dict.fromkeys(["teacher", *wanted])
        }
        timed = _timed(pool, contexts.get(spec.name))
        group = measure_cached_group(backend, cache, timed, shape, cfg.rounds, **kw)
        hits += group.hits
        floors["x".join(map(str, shape))] = group.floor_ms
        teacher_blocks[spec.name] = group.ms["teacher"]
        blocks[spec.name] = {name: ms for name, ms in group.ms.items() if name in wanted}
        exporters["teacher_blocks"][spec.name] = group.exporters["teacher"]
        exporters["blocks"][spec.name] = {name: group.exporters[name] for name in blocks[spec.name]}
        for _ in pool:
            on_done()
    wholes = {"teacher_outside": outside_network(teacher, specs), "teacher": teacher}
    outside = outside_network(shell if shell is not None else teacher, specs)
    if quantize_outside is not None:
        outside = quantize_outside(outside, torch.randn(2, *input_shape[1:]))
    if shell is not None or quantize_outside is not None:
        wholes["outside"] = outside
    group = measure_cached_group(backend, cache, wholes, input_shape, cfg.rounds, **kw)
    hits += group.hits
    measured = group.measured_ms
    outside_key = "outside" if "outside" in wholes else "teacher_outside"
    outside_ms = measured[outside_key]
    teacher_ms = measured["teacher"]
    exporters["outside"] = group.exporters[outside_key]
    exporters["teacher_outside"] = group.exporters["teacher_outside"]
    exporters["teacher"] = group.exporters["teacher"]
    on_done()
    on_done()
    predicted = measured["teacher_outside"] + sum(teacher_blocks.values())
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
        "teacher_outside_ms": measured["teacher_outside"],
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
        "exporters": exporters,
        "platform": backend.cache_key().platform,
    }
