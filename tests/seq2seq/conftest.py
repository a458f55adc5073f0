"""A tiny trained translation teacher, saved as a user's `save_pretrained` folder, and its
toy corpus as a TSV: what the translation pipeline's tests convert."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")

import torch  # noqa: E402

from archnet.zoo.tiny_mt import MTRecipe, build_marian, save_seq2seq, train_bpe, train_mt  # noqa: E402
from tests.zoo.test_tiny_mt import toy_corpus  # noqa: E402


@pytest.fixture(scope="session")
def toy_mt(tmp_path_factory):
    """(teacher folder, TSV of the 200 toy pairs): a 2+2-layer d_model 32 Marian trained
    on 160 of the pairs until it translates most of the rest."""
    root = tmp_path_factory.mktemp("toy_mt")
    corpus = toy_corpus()
    tsv = root / "pairs.tsv"
    tsv.write_text("".join(f"{a}\t{b}\n" for a, b in zip(corpus.source, corpus.target)))
    tok = train_bpe(corpus.source + corpus.target, vocab_size=120, min_frequency=1)
    torch.manual_seed(0)
    model = build_marian(tok, d_model=32, layers=(2, 2), heads=2, ffn=64, dropout=0.0)
    recipe = MTRecipe(
        batch_tokens=1024, lr=1e-2, warmup=20, steps=200, schedule="inverse_sqrt", dropout=0.0
    )
    train_mt(model, tok, corpus.head(180), recipe, log_every=100)
    return save_seq2seq(model, tok, root / "teacher"), tsv
