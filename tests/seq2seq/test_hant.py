"""HANT for encoder-decoder Transformers on a tiny Seq2SeqNet (width 16, vocab 40, 2+2 layers)
taught to copy its source for a few hundred steps, so its layers compute something.

Every candidate keeps the layer's call protocol (forward, greedy and beam decoding with the
cache, cached steps equal to teacher forcing); ``keep`` is the teacher exactly; blockwise
training lowers every trainable candidate's loss; replace-one scores are ~0 for ``keep`` and
positive for ``skip``; cheaper candidates cost less (MACs and parameters always, measured time
at a width where it is reliable); the ILP picks cheaper students at tighter budgets; the
end-to-end fine-tune lowers its loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from archnet.search import minimum, solve
from archnet.seq2seq import hant
from archnet.seq2seq.candidates import (
    DECODER_CANDIDATES,
    ENCODER_CANDIDATES,
    CandidatePool,
    build_candidate,
    build_pool,
)
from archnet.seq2seq.data import make_batches, teacher_pairs
from archnet.seq2seq.decode import beam_search, greedy, pad_batch
from archnet.seq2seq.hant_stage import calibrated_solve
from archnet.seq2seq.layer_latency import measure_latency
from archnet.seq2seq.net import Seq2SeqNet, Taps, additive_mask

torch.set_num_threads(1)

VOCAB, PAD, EOS = 40, 0, 1
MAX_NEW = 12


def _sinusoids(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n)[:, None].float()
    angle = pos / 10000 ** (torch.arange(0, d, 2).float() / d)
    out = torch.zeros(n, d)
    out[:, 0::2], out[:, 1::2] = angle.sin(), angle.cos()
    return out


def _net(width: int = 16, hidden: int = 32, heads: int = 2, layers=(2, 2)) -> Seq2SeqNet:
    torch.manual_seed(0)
    return Seq2SeqNet(
        VOCAB,
        width,
        heads,
        hidden,
        layers,
        _sinusoids(32, width),
        nn.SiLU(),
        PAD,
        EOS,
        PAD,
        embed_scale=math.sqrt(width),
    )


def _sources(n: int, g: torch.Generator) -> list[list[int]]:
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() + [EOS] for k in lengths]


@pytest.fixture(scope="module")
def teacher() -> Seq2SeqNet:
    """Trained to copy its source: 200 Adam steps, ~3 s."""
    net = _net()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        src = _sources(32, g)
        s = pad_batch(src, PAD)
        dec = pad_batch([[PAD, *x[:-1]] for x in src], PAD)
        labels = pad_batch(src, -100)
        logits = net(s, dec)
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def data(teacher):
    """(training batches, selection batches) on the teacher's own greedy translations."""
    g = torch.Generator().manual_seed(1)
    train = make_batches(teacher_pairs(teacher, _sources(80, g), MAX_NEW), teacher, 200, seed=0)
    selection = make_batches(teacher_pairs(teacher, _sources(24, g), MAX_NEW), teacher, 200, 1)
    return train, selection


@pytest.fixture(scope="module")
def pool(teacher, data) -> CandidatePool:
    return hant.train_candidates(teacher, data[0], steps=40, lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def scores(teacher, pool, data):
    return hant.replace_one_scores(teacher, pool, data[1])


@pytest.fixture(scope="module")
def parts(teacher, pool):
    return measure_latency(teacher, pool, warmup=2, repeats=6, rounds=2)


def _sources_tensor() -> torch.Tensor:
    return pad_batch(_sources(3, torch.Generator().manual_seed(5)), PAD)


# --- the candidates inside a network ------------------------------------------------------------


def test_registry_pools(teacher):
    pool = build_pool(teacher)
    assert pool.blocks == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    assert pool.names[0] == list(ENCODER_CANDIDATES) == [
        "keep", "skip", "heads50", "ffn50", "ffn25", "noffn", "noattn"
    ]  # fmt: skip
    assert pool.names[2] == list(DECODER_CANDIDATES)
    assert "nocross" not in DECODER_CANDIDATES and "noattn" not in DECODER_CANDIDATES
    assert "noself" in DECODER_CANDIDATES
    assert (
        build_pool(teacher, ["skip", "noattn"]).names
        == [["keep", "skip", "noattn"]] * 2 + [["keep", "skip"]] * 2
    )
    with pytest.raises(KeyError, match="unknown"):
        build_pool(teacher, ["nocross"])
    with pytest.raises(KeyError, match="decoder-layer candidate"):
        build_candidate("noattn", teacher.decoder[0])
    # one head cannot be halved: the candidate does not apply there
    assert build_candidate("heads50", _net(heads=1).encoder[0]) is None


def _cases():
    return [("encoder", n) for n in ENCODER_CANDIDATES] + [
        ("decoder", n) for n in DECODER_CANDIDATES
    ]


def _stepped_logits(net: Seq2SeqNet, src: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of every position of ``tokens`` (decoder input) decoded step by step with the
    cache, and check the cache protocol: every layer's entry spans the decoded length."""
    keep = src.ne(net.pad)
    memory = net.encode(src, keep)
    cross, mask = net.cross_kv(memory), additive_mask(keep)
    past, out = None, []
    for t in range(tokens.shape[1]):
        logits, past = net.step(tokens[:, t : t + 1], t, cross, mask, past)
        assert all(k.shape[2] == t + 1 and v.shape[2] == t + 1 for k, v in past)
        out.append(logits)
    return torch.stack(out, 1)


@pytest.mark.parametrize(("side", "name"), _cases())
def test_candidate_runs_in_network(teacher, side, name):
    """Put in every layer of one side, the candidate runs forward (with taps), greedy and
    beam decoding, and its cached steps give the teacher-forced logits."""
    n_enc, n_dec = len(teacher.encoder), len(teacher.decoder)
    choice = [name if side == "encoder" else "keep"] * n_enc + [
        name if side == "decoder" else "keep"
    ] * n_dec
    student = hant.assemble(teacher, choice)
    src = _sources_tensor()
    out = greedy(student, src, MAX_NEW)
    assert len(out) == 3 and all(1 <= len(o) <= MAX_NEW for o in out)
    assert all(o[-1] == EOS for o in out)
    assert len(beam_search(student, src[:1], beams=2, max_new=MAX_NEW)[0]) >= 1
    dec_in = pad_batch([[PAD, *o[:-1]] for o in out], PAD)
    with torch.no_grad():
        taps = Taps()
        forced = student(src, dec_in, taps)
        stepped = _stepped_logits(student, src, dec_in)
    assert forced.shape == (3, dec_in.shape[1], VOCAB) and torch.isfinite(forced).all()
    assert len(taps.hidden) == n_enc + n_dec + 2
    real = dec_in.ne(PAD)
    real[:, 0] = True
    torch.testing.assert_close(stepped[real], forced[real], rtol=1e-4, atol=1e-4)


def test_keep_is_the_teacher(teacher, data):
    batch = data[1][0]
    student = hant.assemble(teacher, ["keep"] * 4)
    with torch.no_grad():
        assert torch.equal(student(batch.src, batch.dec_in), teacher(batch.src, batch.dec_in))
    assert student is not teacher and student.encoder[0] is not teacher.encoder[0]
    with pytest.raises(Exception, match="choice names 3"):
        hant.assemble(teacher, ["keep"] * 3)


def test_untrained_candidates_change_the_output(teacher, data):
    """The teacher is not degenerate: every cut changes what it computes."""
    batch = data[1][0]
    with torch.no_grad():
        ref = teacher(batch.src, batch.dec_in)
        for block in hant.block_names(teacher):
            names = ENCODER_CANDIDATES if block.startswith("enc") else DECODER_CANDIDATES
            for name in names:
                if name == "keep":
                    continue
                choice = ["keep"] * 4
                choice[hant.block_names(teacher).index(block)] = name
                logits = hant.assemble(teacher, choice)(batch.src, batch.dec_in)
                assert (logits - ref)[batch.keep].abs().max() > 1e-3, (block, name)


# --- blockwise training and scores --------------------------------------------------------------


def test_blockwise_training_lowers_every_loss(pool):
    for block, start, final in zip(pool.blocks, pool.start_loss, pool.final_loss):
        assert start["keep"] == final["keep"] == 0.0
        assert start["skip"] == final["skip"] > 0.0
        for name in start:
            if name not in ("keep", "skip"):
                assert final[name] < start[name], (block, name, start[name], final[name])


def test_blockwise_training_is_deterministic(teacher, data):
    a = hant.train_candidates(teacher, data[0], ["ffn25", "noself"], steps=3, seed=7)
    b = hant.train_candidates(teacher, data[0], ["ffn25", "noself"], steps=3, seed=7)
    assert a.final_loss == b.final_loss
    for pa, pb in zip(a.modules, b.modules):
        for name in pa:
            for x, y in zip(pa[name].parameters(), pb[name].parameters()):
                assert torch.equal(x, y)


def test_pool_state_round_trip(teacher, pool, data):
    again = CandidatePool.from_state(teacher, pool.state_dict())
    assert again.names == pool.names and again.final_loss == pool.final_loss
    batch = data[1][0]
    choice = ["ffn25", "noattn", "heads50", "noself"]
    with torch.no_grad():
        a = hant.assemble(teacher, choice, pool)(batch.src, batch.dec_in)
        b = hant.assemble(teacher, choice, again)(batch.src, batch.dec_in)
    assert torch.equal(a, b)


def test_replace_one_scores(pool, scores):
    assert len(scores) == len(pool.blocks)
    for block, per in zip(pool.blocks, scores):
        assert list(per) == list(pool.modules[pool.blocks.index(block)])
        assert abs(per["keep"]) < 1e-6
        assert per["skip"] > 1e-3
        assert all(math.isfinite(v) and v > -1e-6 for v in per.values())


# --- costs, search, student ---------------------------------------------------------------------


def test_cheaper_candidates_cost_less(teacher, pool, parts):
    """Fewer MACs per call and fewer parameters for every cut, at the tiny width (where time
    is noise; see test_latency_drops_at_width for measured time)."""
    for b, block in enumerate(pool.blocks):
        macs, params = (
            parts.macs_per_call[b],
            {k: sum(p.numel() for p in m.parameters()) for k, m in pool.modules[b].items()},
        )
        for name in macs:
            if name != "keep":
                assert macs[name] < macs["keep"], (block, name)
                assert params[name] < params["keep"], (block, name)
        assert macs["skip"] == 0 and params["skip"] == 0
        if block.startswith("decoder"):
            kv = parts.macs_per_sentence[b]
            assert kv["skip"] == 0 and kv["heads50"] < kv["keep"]
    assert parts.src_len == 32 and parts.encoder_fixed_ms > 0 and parts.step_fixed_ms > 0


def test_latency_drops_at_width():
    """Measured on onnxruntime (1 thread) at width 256, FFN 1024: a quarter of the FFN, half
    the heads and the identity are faster than the teacher layer."""
    net = _net(width=256, hidden=1024, heads=4, layers=(1, 1)).eval()
    pool = build_pool(net, ["skip", "heads50", "ffn25"])
    parts = measure_latency(net, pool, warmup=5, repeats=30, rounds=3)
    enc, dec = parts.per_call
    assert enc["ffn25"] < 0.9 * enc["keep"]
    assert enc["heads50"] < enc["keep"]
    assert enc["skip"] < 0.1 * enc["keep"]
    assert dec["ffn25"] < dec["keep"] and dec["skip"] < 0.1 * dec["keep"]
    assert parts.per_sentence[1]["heads50"] < parts.per_sentence[1]["keep"]
    assert parts.per_sentence[1]["skip"] == 0.0


def test_search_table_and_budgets(teacher, pool, scores, parts, data):
    out_tokens = hant.mean_output_tokens(data[1])
    lengths = [int(n) for b in data[1] for n in b.keep.sum(1)]
    assert out_tokens == pytest.approx(sum(lengths) / len(lengths))
    table = hant.search_table(teacher, pool, scores, parts, out_tokens)
    keep = hant.teacher_choice(table)
    predicted = parts.predict_ms(["keep"] * 4, out_tokens)
    assert table.total(hant.LATENCY, keep) == pytest.approx(predicted)
    assert table.total("params", keep) == sum(p.numel() for p in teacher.parameters())

    loose = solve(table, {hant.LATENCY: table.total(hant.LATENCY, keep)})
    assert loose.names == ["keep"] * 4
    tight_budget = minimum(table, hant.LATENCY) * 1.05
    tight = solve(table, {hant.LATENCY: tight_budget})
    assert tight.totals[hant.LATENCY] <= tight_budget + 1e-12
    assert tight.totals[hant.LATENCY] < loose.totals[hant.LATENCY]
    assert tight.names.count("keep") < 4
    assert tight.objective > loose.objective
    # the same on MACs, which no timing noise can reorder
    macs = solve(table, {"macs": minimum(table, "macs") * 1.05})
    assert macs.totals["macs"] < loose.totals["macs"] and "keep" not in macs.names


def test_finetune_recovers_the_student(teacher, pool, data):
    train, selection = data
    student = hant.assemble(teacher, ["ffn25", "noattn", "heads50", "noself"], pool)

    def objective(net):
        with torch.no_grad():
            return sum(
                float(hant.kd_loss(net(b.src, b.dec_in), teacher(b.src, b.dec_in), b))
                for b in selection
            )

    before = objective(student)
    weights = [p.detach().clone() for p in teacher.parameters()]
    history = hant.finetune(student, teacher, train, steps=30, lr=2e-3, seed=0)
    assert len(history) == 30 and all(math.isfinite(v) for v in history)
    assert sum(history[-5:]) < sum(history[:5])
    assert objective(student) < before  # on held-out batches
    assert not student.training
    assert all(torch.equal(w, p) for w, p in zip(weights, teacher.parameters()))


@pytest.mark.parametrize("bias", [1.25, 0.8], ids=["prediction-undershoots", "overshoots"])
def test_calibrated_solve_holds_the_measured_budget(teacher, pool, scores, parts, data, bias):
    """A "measurement" that is the prediction off by a constant factor (what host overhead
    per translation does): the kept choice is within the budget as measured, and no worse
    scored than what a solve at the exact (unknown) correction would give."""
    table = hant.search_table(teacher, pool, scores, parts, hant.mean_output_tokens(data[1]))
    teacher_ms = table.total(hant.LATENCY, hant.teacher_choice(table))

    def measure(names):
        choice = [c.index(n) for c, n in zip(table.candidates, names)]
        return bias * table.total(hant.LATENCY, choice) / teacher_ms

    result, tried = calibrated_solve(table, 0.6, measure, lambda _: None)
    assert measure(result.names) <= 0.6 + 1e-9
    assert sum(t.get("kept", False) for t in tried) == 1
    exact = solve(table, {hant.LATENCY: 0.6 / bias * teacher_ms})
    assert result.objective <= exact.objective + 1e-9
    first = solve(table, {hant.LATENCY: 0.6 * teacher_ms})
    if bias > 1:  # the first choice, measured, broke the budget
        assert measure(first.names) > 0.6 or first.names == result.names
    else:  # a looser budget was used, for a choice the first solve could not afford
        assert len(tried) >= 2 or first.names == result.names


def test_calibrated_solve_keeps_the_fastest_when_none_fits(teacher, pool, scores, parts, data):
    table = hant.search_table(teacher, pool, scores, parts, hant.mean_output_tokens(data[1]))
    lines = []
    result, tried = calibrated_solve(table, 0.6, lambda names: 2.0, lines.append)
    assert not any(t["within_budget"] for t in tried)
    assert any("no choice measured within" in line for line in lines)
