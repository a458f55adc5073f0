"""The features stage: the teacher's block inputs and outputs, cached once for every job.

Blockwise training reads the first ``blockwise.max_samples`` training images, so only those
are captured (the end-to-end stage runs the teacher itself, on every training image).
"""

from __future__ import annotations

from archnet.features import FeatureCache
from archnet.results import FeaturesResult
from archnet.stages import common
from archnet.store import RunStore

SPLITS = ("train", "selection")


def cache(store: RunStore) -> FeatureCache:
    return FeatureCache(store.path("features"))


def sizes(store: RunStore) -> dict[str, int]:
    """Images captured per split."""
    out = {split: store.prepared.splits[split] for split in SPLITS}
    cap = store.config.blockwise.max_samples
    if cap is not None:
        out["train"] = min(out["train"], cap)
    return out


def run(store: RunStore) -> FeaturesResult:
    features, counts = cache(store), sizes(store)
    with common.progress_bar() as bar:
        for split, n in counts.items():
            inputs = common.task(store).inputs(store, split)[:n]
            features.write(
                store.teacher,
                common.specs(store),
                inputs,
                split,
                progress=bar,
                device=common.device(store),
            )
    return FeaturesResult(splits=counts)


def verify(store: RunStore) -> str | None:
    """Why the cached features cannot be used (missing or truncated files), or None."""
    return cache(store).problem(SPLITS, common.specs(store), sizes(store))
