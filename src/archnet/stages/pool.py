"""The candidates stage: every block's pool, filtered by what the target can run."""

from __future__ import annotations

import copy

from torch import nn

from archnet.blocks import BlockSpec
from archnet.candidates import build_pool
from archnet.channelsplit import split_wide_layers
from archnet.choices import Bits, choice_name, quantize_from
from archnet.errors import ArchnetError
from archnet.flops import count_macs, count_params
from archnet.quant import QuantModule, is_quantized, model_size_bits
from archnet.results import PoolResult
from archnet.stages import common
from archnet.store import RunStore

# the MACs cap of HANT mode: candidates costlier than this x their teacher block are dropped
HANT_MACS_CAP = 1.5


def run(store: RunStore) -> PoolResult:
    """Build every block's pool; keep only candidates the target can run."""
    from archnet.targets import rejects

    target = common.target(store)
    mode = common.mode(store)
    if target.allowed_ops is not None or target.rules:  # seconds now, not hours later
        from archnet.plan import preflight

        quantize = None
        if common.bit_options(store) != [None]:  # the shell as a quantized student has it
            quantize = lambda m, x: common.quantize_outside(store, m, x)  # noqa: E731
        shell = common.shell(store)[0]
        preflight(shell, common.specs(store), target, common.input_shape(store), quantize)
    cap = store.config.max_macs_ratio
    if cap is None:
        cap = HANT_MACS_CAP if mode == "hant" else 0
    max_channels = target.rules.max_channels if mode == "archnet" else None
    options = common.bit_options(store)
    pools, rejected = {}, {}
    for spec in common.specs(store):
        pool = build_pool(
            spec, common.teacher_block(store, spec), store.config.candidates.split(",")
        )
        teacher_macs = max(count_macs(pool["teacher"], spec.in_shape), 1)
        kept, costs = [], {}
        for name, module in pool.items():
            if max_channels:
                split_wide_layers(module, max_channels)
            macs = count_macs(module, spec.in_shape)
            # a quantized student is checked as it will run: as its QDQ graph
            sizes, checked = _choice_sizes(module, options, spec, target.requantize)
            reason = rejects(target, checked, (1, *spec.in_shape))
            if not reason and cap and name != "teacher" and macs > cap * teacher_macs:
                reason = f"{macs / teacher_macs:.1f}x the teacher block's MACs (cap {cap})"
            if reason:
                rejected.setdefault(spec.name, {})[name] = reason
                continue
            kept.append(name)
            params = count_params(module)
            for bits, size in sizes.items():
                costs[choice_name(name, bits)] = {"params": params, "macs": macs, "size_bits": size}
        if not kept:
            raise ArchnetError(
                f"block {spec.name}: no candidate runs on target {target.name}, not even the "
                "teacher's own block; widen --candidates or use another target"
            )
        pools[spec.name] = {"candidates": kept, "choices": list(costs), "costs": costs}
    unserved = {
        s.name: _why_unserved(s, rejected.get(s.name, {}))
        for s in common.specs(store)
        if pools[s.name]["candidates"] == ["teacher"]
    }
    _check_served(unserved, len(pools))
    return PoolResult(pools=pools, rejected=rejected, unserved=unserved)


def _choice_sizes(
    module: nn.Module, options: list[Bits | None], spec: BlockSpec, requantize: bool
) -> tuple[dict[Bits | None, int], nn.Module]:
    """Size in bits of ``module`` at each bit option, and the module to check on the target:
    the float module, or its quantized version in a quantized run."""
    if options == [None]:
        return {None: model_size_bits(module)}, module
    quantized = quantize_from(copy.deepcopy(module), options[0], spec, requantize=requantize)
    weights = sum(m.weight.numel() for m in quantized.modules() if isinstance(m, QuantModule))
    rest = model_size_bits(quantized) - weights * options[0][0]
    if not is_quantized(quantized):
        options = options[:1]  # nothing to quantize (an identity skip): one choice is enough
    return {bits: rest + weights * bits[0] for bits in options}, quantized


def _why_unserved(spec: BlockSpec, rejected: dict[str, str]) -> str:
    """Why only the teacher's own block can go at ``spec``, in words a user can act on."""
    if spec.layout in ("tokens", "vector") and spec.in_shape[:-1] != spec.out_shape[:-1]:
        return (
            f"its {spec.layout} stream {spec.in_shape} -> {spec.out_shape} changes length, and "
            "the families serving that layout (skip, linear) keep it"
        )
    if spec.stride == 0 and spec.strides is None:
        return f"it does not down-sample by an integer factor ({spec.in_shape} -> {spec.out_shape})"
    if rejected:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(rejected.items())[:3])
        return f"the target or the MACs cap refused every candidate ({reasons})"
    return (
        f"no selected candidate family builds a module for its {spec.layout} shapes; widen "
        "--candidates"
    )


def _check_served(unserved: dict[str, str], n_blocks: int) -> None:
    """Warn about each block nothing can replace; refuse a run where no block can change."""
    if len(unserved) == n_blocks:
        first = next(iter(unserved.items()))
        raise ArchnetError(
            f"no block of this model can change: {len(unserved)} blocks, none served by a "
            f"candidate family (e.g. {first[0]}: {first[1]})"
        )
    for name, why in unserved.items():
        common.warn(f"block {name} stays the teacher's: {why}")
