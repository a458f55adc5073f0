"""The tiny translation teacher: BPE, a Marian model from a config, training, saving, scoring.

The corpus is made up (200 pairs of 'the man sees the city today.' -> 'Der Mann sieht heute
die Stadt.'), so the tests need neither the Bible package nor a download; the model is a
2+2-layer d_model 32 Marian that learns a few of those pairs by heart in ~100 steps.
"""

from __future__ import annotations

import itertools
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("sacrebleu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from archnet.data.corpus import ParallelCorpus  # noqa: E402
from archnet.errors import ArchnetError  # noqa: E402
from archnet.zoo.tiny_mt import (  # noqa: E402
    MTRecipe,
    _LinearSmoothedCE,
    bleu_chrf,
    build_marian,
    length_batches,
    load_hf_seq2seq,
    save_seq2seq,
    train_bpe,
    train_mt,
    translate,
)

SUBJECTS = [("the man", "der Mann"), ("the woman", "die Frau"), ("the child", "das Kind")]
SUBJECTS += [("the king", "der König"), ("the servant", "der Knecht")]
VERBS = [("sees", "sieht"), ("hears", "hört"), ("calls", "ruft"), ("blesses", "segnet")]
OBJECTS = [("the city", "die Stadt"), ("the house", "das Haus"), ("the land", "das Land")]
OBJECTS += [("the people", "das Volk"), ("the temple", "den Tempel")]
TIMES = [("today", "heute"), ("at night", "in der Nacht")]
FEW = 6  # pairs the model learns by heart


def _upper_first(text: str) -> str:
    return text[0].upper() + text[1:]


def toy_corpus() -> ParallelCorpus:
    """200 pairs; German puts the time before the object, so it is not word-for-word."""
    src, tgt = [], []
    for (s, s_de), (v, v_de), (o, o_de), (t, t_de) in itertools.product(
        SUBJECTS, VERBS, OBJECTS, TIMES
    ):
        src.append(_upper_first(f"{s} {v} {o} {t}."))
        tgt.append(_upper_first(f"{s_de} {v_de} {t_de} {o_de}."))
    return ParallelCorpus(src, tgt, name="toy")


@pytest.fixture(scope="module")
def trained():
    corpus = toy_corpus()
    assert len(corpus) == 200
    tok = train_bpe(corpus.source + corpus.target, vocab_size=120, min_frequency=1)
    torch.manual_seed(0)
    model = build_marian(tok, d_model=32, layers=(2, 2), heads=2, ffn=64, dropout=0.0)
    recipe = MTRecipe(
        batch_tokens=4096, lr=1e-2, warmup=10, steps=100, schedule="inverse_sqrt", dropout=0.0
    )
    seen: list[dict] = []
    history = train_mt(model, tok, corpus.head(FEW), recipe, progress=seen.append, log_every=20)
    return model, tok, corpus.head(FEW), history, seen


def test_tokenizer_round_trips_and_appends_eos():
    corpus = toy_corpus()
    tok = train_bpe(corpus.source + corpus.target, vocab_size=120, min_frequency=1)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok(corpus.target[:3])["input_ids"]
    assert all(x[-1] == tok.eos_token_id for x in ids)
    assert tok.batch_decode(ids, skip_special_tokens=True) == corpus.target[:3]


def test_build_marian_ties_embeddings():
    tok = train_bpe(toy_corpus().source, vocab_size=80, min_frequency=1)
    model = build_marian(tok, d_model=32, layers=(2, 2), heads=2, ffn=64)
    shared = model.model.shared.weight
    assert model.lm_head.weight is shared
    assert model.model.encoder.embed_tokens.weight is shared
    assert model.model.decoder.embed_tokens.weight is shared
    assert model.config.decoder_start_token_id == tok.pad_token_id
    assert model.generation_config.bad_words_ids == [[tok.pad_token_id]]


def test_training_overfits_a_few_pairs(trained):
    model, tok, few, history, seen = trained
    assert seen == history and [r["step"] for r in history] == [20, 40, 60, 80, 100]
    assert history[-1]["loss"] < history[0]["loss"] / 2
    hyps = translate(model, tok, few.source, beams=1, max_new_tokens=24)
    assert sum(h == r for h, r in zip(hyps, few.target)) >= FEW - 1
    assert bleu_chrf(hyps, few.target)["bleu"] > 80


def test_save_load_round_trip(trained, tmp_path):
    model, tok, few, _, _ = trained
    folder = save_seq2seq(model, tok, tmp_path / "teacher")
    loaded, loaded_tok = load_hf_seq2seq(folder)
    assert type(loaded).__name__ == "MarianMTModel" and not loaded.training
    assert loaded_tok.pad_token_id == tok.pad_token_id and len(loaded_tok) == len(tok)
    for beams in (1, 2):
        before = translate(model, tok, few.source, beams=beams, max_new_tokens=24)
        after = translate(loaded, loaded_tok, few.source, beams=beams, max_new_tokens=24)
        assert before == after


def test_load_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(ArchnetError, match="no config.json"):
        load_hf_seq2seq(tmp_path / "missing")


def test_fused_loss_matches_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(700, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias, labels = torch.randn(50, dtype=torch.float64), torch.randint(0, 50, (700,))
    fused = _LinearSmoothedCE.apply(hidden, weight, bias, labels, 0.1)
    grads = torch.autograd.grad(fused, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.t() + bias, labels, label_smoothing=0.1)
    expected = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(fused, plain)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_length_batches_cover_each_pair_once_within_budget():
    lengths = [3, 50, 7, 7, 20, 1, 33, 12, 12, 9] * 5
    batches = length_batches(lengths, batch_tokens=64, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) * len(b) <= 64 for b in batches)
    assert batches == length_batches(lengths, batch_tokens=64, seed=1)


def test_bleu_chrf_scores_and_signatures():
    refs = ["Der Mann sieht heute die Stadt.", "Das Kind hört das Volk."]
    perfect = bleu_chrf(refs, refs)
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    assert "tok:13a" in perfect["bleu_signature"] and "nc:6" in perfect["chrf_signature"]
    assert bleu_chrf(["Die Frau ruft.", "Ein Haus."], refs)["bleu"] < 50
    with pytest.raises(ArchnetError, match="references"):
        bleu_chrf(refs[:1], refs)


def test_time_budget_stops_training_and_recipe_builds_the_model():
    corpus = toy_corpus()
    tok = train_bpe(corpus.source + corpus.target, vocab_size=120, min_frequency=1)
    recipe = MTRecipe(d_model=32, layers=(2, 2), heads=2, ffn=64, steps=10_000, max_seconds=0.5)
    recipe.schedule, recipe.warmup = "cosine", 5
    model = build_marian(tok, **recipe.model_kwargs())
    assert model.config.d_model == 32 and model.config.decoder_layers == 2
    history = train_mt(model, tok, corpus, recipe, log_every=10_000)
    assert len(history) == 1 and history[0]["step"] < 10_000 and history[0]["lr"] >= 0


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    corpus = toy_corpus().head(FEW)
    tok = train_bpe(corpus.source + corpus.target, vocab_size=120, min_frequency=1)
    recipe = MTRecipe(batch_tokens=64, lr=1e-2, warmup=4, steps=12, dropout=0.0)

    def fresh():
        torch.manual_seed(0)
        return build_marian(tok, d_model=16, layers=(1, 1), heads=2, ffn=32, dropout=0.0)

    whole = fresh()
    train_mt(whole, tok, corpus, recipe, log_every=4)

    def stop_at_8(record):
        if record["step"] == 8:
            raise KeyboardInterrupt

    ckpt, cut = tmp_path / "train.ckpt", fresh()
    with pytest.raises(KeyboardInterrupt):
        train_mt(
            cut, tok, corpus, recipe, stop_at_8, log_every=4, checkpoint=ckpt, checkpoint_every=4
        )
    resumed = fresh()
    history = train_mt(resumed, tok, corpus, recipe, log_every=4, checkpoint=ckpt)
    assert [r["step"] for r in history] == [4, 8, 12]
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ArchnetError, match="lr changed"):
        train_mt(
            fresh(), tok, corpus, MTRecipe(**{**recipe.to_dict(), "lr": 5e-3}), checkpoint=ckpt
        )
