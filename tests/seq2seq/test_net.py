"""The mirror of a Hugging Face model computes its function: logits and greedy tokens equal
``transformers``' own, for Marian (sinusoids, SiLU, sqrt(d) embedding scale) and BART (learned
positions at offset 2, embedding LayerNorms, GELU, no scale)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from archnet.errors import ArchnetError  # noqa: E402
from archnet.seq2seq.decode import beam_search, greedy, pad_batch  # noqa: E402
from archnet.seq2seq.net import Taps, from_hf, layer_names  # noqa: E402

VOCAB, PAD, EOS = 40, 0, 1


def _marian():
    cfg = transformers.MarianConfig(
        vocab_size=VOCAB,
        decoder_vocab_size=VOCAB,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        init_std=0.3,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        forced_eos_token_id=EOS,
        dropout=0.0,
        activation_function="swish",
    )
    torch.manual_seed(0)
    return transformers.MarianMTModel(cfg).eval()


def _bart():
    cfg = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        init_std=0.3,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=EOS,
        forced_bos_token_id=None,
        dropout=0.0,
        activation_function="gelu",
    )
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(cfg).eval()


def _sources() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    lengths = [7, 3, 5]
    return pad_batch(
        [torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() + [EOS] for n in lengths], PAD
    )


@pytest.mark.parametrize("make", [_marian, _bart], ids=["marian", "bart"])
def test_logits_equal_transformers(make):
    model = make()
    net = from_hf(model)
    src = _sources()
    tgt = torch.cat([torch.full((3, 1), model.config.decoder_start_token_id), src[:, :-1]], 1)
    tgt = tgt.masked_fill(src.eq(PAD), PAD)  # padded decoder inputs at the end
    with torch.no_grad():
        ref = model(input_ids=src, attention_mask=src.ne(PAD), decoder_input_ids=tgt).logits
        ours = net(src, tgt)
    real = tgt.ne(PAD)
    real[:, 0] = True
    assert ref.abs().max() > 1.0  # a model whose logits say something
    torch.testing.assert_close(ours[real], ref[real], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [_marian, _bart], ids=["marian", "bart"])
def test_greedy_tokens_equal_generate(make):
    model = make()
    net = from_hf(model)
    src = _sources()
    ref = model.generate(
        input_ids=src,
        attention_mask=src.ne(PAD),
        num_beams=1,
        do_sample=False,
        max_new_tokens=12,
        bad_words_ids=[[PAD]],
        min_length=0,
    )
    ours = greedy(net, src, max_new=12)
    for row, tokens in zip(ref.tolist(), ours):
        expected = row[1:]
        expected = expected[: expected.index(EOS) + 1] if EOS in expected else expected
        assert tokens == expected
    assert len({tuple(t) for t in ours}) > 1  # the sentences decode differently


def _mean_logp(net, src, tokens) -> float:
    tgt = torch.tensor([[net.start, *tokens[:-1]]])
    lp = net(src[None, : int(src.ne(PAD).sum())], tgt).log_softmax(-1)
    return float(lp[0, torch.arange(len(tokens)), tokens].sum()) / len(tokens)


@torch.no_grad()
def test_beam_search_scores_at_least_greedy():
    net = from_hf(_marian())
    src = _sources()
    for row, g, b in zip(src, greedy(net, src, 10), beam_search(net, src, 4, 10)):
        assert _mean_logp(net, row, b) >= _mean_logp(net, row, g) - 1e-5


def test_taps_follow_the_schedule_order():
    net = from_hf(_marian())
    taps = Taps()
    src = _sources()
    net(src, torch.full((3, 4), net.start), taps)
    names = layer_names(net)
    assert len(taps.hidden) == len(names) == 6
    assert [len(a) for a in taps.attention] == [0, 1, 1, 0, 2, 2]
    assert taps.hidden[0].shape == (3, src.shape[1], 16)
    assert taps.attention[4][1].shape == (3, 2, 4, src.shape[1])  # cross: queries x sources


def test_pre_norm_models_are_refused():
    cfg = _bart().config
    cfg.normalize_before = True
    model = transformers.BartForConditionalGeneration(cfg)
    with pytest.raises(ArchnetError, match="pre-norm"):
        from_hf(model)
