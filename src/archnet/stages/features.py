"""The features stage: the teacher's block inputs and outputs, cached once for every job."""

from __future__ import annotations

from archnet.features import FeatureCache
from archnet.results import FeaturesResult
from archnet.stages import common
from archnet.store import RunStore

SPLITS = ("train", "selection")


def cache(store: RunStore) -> FeatureCache:
    return FeatureCache(store.path("features"))


def run(store: RunStore) -> FeaturesResult:
    features = cache(store)
    sizes = {}
    with common.progress_bar() as bar:
        for split in SPLITS:
            inputs = common.task(store).inputs(store, split)
            features.write(store.teacher, common.specs(store), inputs, split, progress=bar)
            sizes[split] = len(inputs)
    return FeaturesResult(splits=sizes)


def verify(store: RunStore) -> str | None:
    """Why the cached features cannot be used (missing or truncated files), or None."""
    return cache(store).problem(SPLITS, common.specs(store), store.prepared.splits)
