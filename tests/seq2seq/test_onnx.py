"""The exported encoder and decoder-step graphs compute what the PyTorch net computes, decode to
its greedy tokens on onnxruntime, and a student's graphs (float and W4A4 QDQ) use only
``archnet-transformer`` operators."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from archnet.errors import ArchnetError
from archnet.quant import QuantConfig, quantize_model
from archnet.seq2seq.decode import greedy, pad_batch
from archnet.seq2seq.net import Seq2SeqNet, additive_mask
from archnet.seq2seq.onnx import (
    OnnxTranslator,
    check_seq2seq,
    export_seq2seq,
)
from archnet.seq2seq.restrict import reset_batch_norms, restrict_seq2seq
from archnet.seq2seq.timing import time_translations

VOCAB, PAD, EOS, MAX_LEN, SRC_LEN = 40, 0, 1, 16, 12
FORBIDDEN = {"LayerNormalization", "Gelu", "Erf", "Gather", "Mul", "Slice", "Shape", "Split"}


def _sinusoids(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    angle = pos / 10000 ** (2 * torch.arange(d // 2, dtype=torch.float32)[None] / d)
    return torch.cat([angle.sin(), angle.cos()], 1)


def _reverse_batch(g: torch.Generator, size: int) -> tuple[torch.Tensor, ...]:
    """Source ids, decoder inputs and next tokens of the task 'reverse the sentence', padded."""
    seqs = [
        torch.randint(3, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        for _ in range(size)
    ]
    src = pad_batch([s.tolist() + [EOS] for s in seqs], PAD)
    full = [[PAD, *s.flip(0).tolist(), EOS] for s in seqs]
    return src, pad_batch([f[:-1] for f in full], PAD), pad_batch([f[1:] for f in full], PAD)


@pytest.fixture(scope="module")
def teacher() -> Seq2SeqNet:
    """A Marian-shaped net (sinusoids, SiLU, sqrt(d) scale) trained briefly to reverse
    sentences: its greedy output varies in tokens and length (a random one repeats a token)."""
    torch.manual_seed(0)
    net = Seq2SeqNet(VOCAB, 16, 2, 32, (2, 2), _sinusoids(64, 16), nn.SiLU(), PAD, EOS, PAD, 4.0)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    try:
        for _ in range(150):
            src, tgt, nxt = _reverse_batch(g, 16)
            logits = net(src, tgt)
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1), nxt.flatten(), ignore_index=PAD
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(source ids, decoder inputs): 5 sentences of different lengths."""
    return _reverse_batch(torch.Generator().manual_seed(5), 5)[:2]


@pytest.fixture(scope="module")
def student(teacher, batch) -> Seq2SeqNet:
    net = restrict_seq2seq(teacher)
    reset_batch_norms(net, [batch])
    return net.eval()


@pytest.fixture(params=["teacher", "student"])
def net(request, teacher, student) -> Seq2SeqNet:
    return {"teacher": teacher, "student": student}[request.param]


@torch.no_grad()
def _max_errors(net: Seq2SeqNet, translator: OnnxTranslator, src: torch.Tensor, steps: int = 5):
    """Max |ORT - PyTorch| over the encoder's cross keys/values, then over ``steps`` decoder
    steps' logits and new cache entries (fed the same tokens)."""
    keep = src.ne(net.pad)
    cross = net.cross_kv(net.encode(src, keep))
    got, mask = translator.encode(src)
    n = src.shape[1]
    ref = [t for kv in cross for t in kv]
    enc = max(float(np.abs(o[:, :, :n] - r.numpy()).max()) for o, r in zip(got, ref))
    assert np.all(mask[..., n:] < -1e8)  # a fixed graph's extra source slots are padding
    cache, past = translator.new_cache(len(src)), None
    token = torch.tensor([[net.start]] * len(src))
    step = 0.0
    for t in range(steps):
        logits, past = net.step(token, t, cross, additive_mask(keep), past)
        got_logits = translator.step(token[:, 0].numpy(), t, cache, got, mask)
        step = max(step, float(np.abs(got_logits - logits.numpy()).max()))
        for slots, (k, v) in zip(zip(cache[::2], cache[1::2]), past):
            step = max(step, float(np.abs(slots[0][:, :, t] - k[:, :, t].numpy()).max()))
            step = max(step, float(np.abs(slots[1][:, :, t] - v[:, :, t].numpy()).max()))
        token = logits.argmax(-1, keepdim=True)
    return enc, step


@pytest.mark.parametrize("src_len", [None, SRC_LEN], ids=["any_length", "fixed_length"])
def test_graphs_compute_encode_and_step(net, batch, tmp_path, src_len):
    exported = export_seq2seq(net, tmp_path, MAX_LEN, src_len=src_len)
    assert exported.one_hot == (not isinstance(net.embed, nn.Embedding))  # student: one-hot
    enc, step = _max_errors(net, exported.translator(), batch[0])
    assert enc < 1e-4 and step < 1e-4, (enc, step)


@pytest.mark.parametrize("src_len", [None, SRC_LEN], ids=["any_length", "fixed_length"])
def test_greedy_tokens_equal_pytorch(net, batch, tmp_path, src_len):
    src = batch[0]
    assert src.eq(PAD).any()  # sentences of different lengths, padded
    exported = export_seq2seq(net, tmp_path, MAX_LEN, src_len=src_len)
    translator = OnnxTranslator(
        exported.encoder, exported.decoder, PAD, EOS, PAD, VOCAB, MAX_LEN, threads=1
    )
    ours, theirs = translator.greedy(src, MAX_LEN), greedy(net, src, MAX_LEN)
    assert ours == theirs
    assert len({len(row) for row in theirs}) > 1  # not a degenerate decoder: lengths differ
    assert all(row[-1] == EOS for row in theirs)
    short = translator.greedy(src, 3)  # eos forced at the last allowed step
    assert short == greedy(net, src, 3) and all(len(r) <= 3 and r[-1] == EOS for r in short)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_student_graphs_use_archnet_transformer_operators_only(student, tmp_path):
    exported = export_seq2seq(student, tmp_path, MAX_LEN, src_len=SRC_LEN)
    for name, report in check_seq2seq(exported, "archnet-transformer").items():
        assert report.violations == () and report.unverified == (), (name, report)
    for path in (exported.encoder, exported.decoder):
        assert not FORBIDDEN & set(_ops(path)), _ops(path)
    inputs = {i.name: i for i in onnx.load(str(exported.encoder)).graph.input}
    assert inputs["src"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # one-hot rows
    # any source length costs shape arithmetic in the encoder only; the step needs none
    loose = export_seq2seq(student, tmp_path / "any", MAX_LEN)
    reports = check_seq2seq(loose, "archnet-transformer")
    assert reports["decoder_step"].violations == ()
    assert {v.op_type for v in reports["encoder"].violations} >= {"Shape", "Slice"}


def test_teacher_graphs_break_archnet_transformer(teacher, tmp_path):
    exported = export_seq2seq(teacher, tmp_path, MAX_LEN, src_len=SRC_LEN)
    reports = check_seq2seq(exported, "archnet-transformer")
    for report in reports.values():
        ops = {v.op_type for v in report.violations}
        assert {"LayerNormalization", "Gather", "Mul"} <= ops, ops
    assert exported.one_hot is False


@torch.no_grad()
def test_w4a4_student_exports_qdq_that_matches_fake_quant(student, batch, tmp_path):
    q = copy.deepcopy(student)
    quantize_model(q, QuantConfig(4, 4))
    q.eval()(*batch)  # calibration: every quantizer takes its step
    exported = export_seq2seq(q, tmp_path, MAX_LEN, src_len=SRC_LEN)
    assert exported.quantized
    for name, report in check_seq2seq(exported, "archnet-transformer").items():
        assert report.violations == (), (name, report.violations)
        assert report.tensors, name  # declared widths, proven by the graph
    assert _ops(exported.decoder)["QuantizeLinear"] > 0
    # as written the QDQ graph is the fake-quant arithmetic
    enc, step = _max_errors(q, exported.translator(optimize=False), batch[0])
    assert enc < 1e-4 and step < 1e-4, (enc, step)
    src = batch[0]
    assert exported.translator(optimize=False).greedy(src, MAX_LEN) == greedy(q, src, MAX_LEN)
    # optimised, onnxruntime rounds each bias onto the integer accumulator grid: the trained
    # student already adds it there (QuantLinear.quant_bias), so its tokens do not move
    fast = exported.translator(optimize=True)
    enc, step = _max_errors(q, fast, batch[0])
    assert enc < 1e-3 and step < 1e-3, (enc, step)
    assert fast.greedy(src, MAX_LEN) == greedy(q, src, MAX_LEN)
    float_twin = export_seq2seq(q, tmp_path / "float", MAX_LEN, quantized=False)
    assert not float_twin.quantized and _ops(float_twin.decoder)["QuantizeLinear"] == 0


def test_bart_mirror_with_embedding_norms(tmp_path):
    pytest.importorskip("transformers")
    from archnet.seq2seq.net import from_hf
    from tests.seq2seq.test_net import _bart

    net = from_hf(_bart())  # embedding LayerNorms, GELU, learned positions, start token 2
    src = _reverse_batch(torch.Generator().manual_seed(3), 4)[0]
    exported = export_seq2seq(net, tmp_path, MAX_LEN)
    translator = exported.translator()
    enc, step = _max_errors(net, translator, src)
    assert enc < 1e-4 and step < 1e-4, (enc, step)
    assert translator.greedy(src, MAX_LEN) == greedy(net, src, MAX_LEN)


def test_latency_of_teacher_and_student(teacher, student, batch, tmp_path):
    src = batch[0]
    exported = export_seq2seq(student, tmp_path, MAX_LEN, src_len=SRC_LEN)
    models = {"teacher": teacher, "student": exported}
    timed = time_translations(models, src, max_new=MAX_LEN, rounds=3, warmup=1)
    assert timed["teacher"].batch == len(src) and timed["teacher"].src_len == src.shape[1]
    assert timed["teacher"].max_len == MAX_LEN and 1 <= timed["teacher"].steps <= MAX_LEN
    assert timed["student"].src_len == SRC_LEN
    assert timed["teacher"].ratio == 1.0 and timed["student"].ratio > 0
    for t in timed.values():
        assert t.encoder_ms > 0 and 0 < t.step_ms < t.translate_ms
    fixed = time_translations(models, src, max_new=MAX_LEN, rounds=1, warmup=0, fixed=True)
    assert all(t.steps == MAX_LEN for t in fixed.values())  # no early stop


def test_export_refuses_what_it_cannot_run(teacher, batch, tmp_path):
    with pytest.raises(ArchnetError, match="max_len"):
        export_seq2seq(teacher, tmp_path, teacher.max_positions + 1)
    with pytest.raises(ArchnetError, match="fake-quantized"):
        export_seq2seq(teacher, tmp_path, MAX_LEN, quantized=True)
    exported = export_seq2seq(teacher, tmp_path, MAX_LEN, src_len=4)
    with pytest.raises(ArchnetError, match="longer"):
        exported.translator().greedy(batch[0], MAX_LEN)
    with pytest.raises(ArchnetError, match="slots"):
        OnnxTranslator(exported.encoder, exported.decoder, PAD, EOS, PAD, VOCAB, MAX_LEN + 1)


@pytest.mark.parametrize(
    "choice",
    [
        ("noattn", "skip", "noself", "skip"),
        ("skip", "noffn", "heads50", "noffn"),
        ("ffn25", "keep", "skip", "noself"),
    ],
    ids=["noattn-skip", "noffn-heads50", "ffn25-noself"],
)
def test_hant_students_export_and_decode_as_in_pytorch(teacher, batch, tmp_path, choice):
    """HANT cuts drop sublayers (no cache for a layer without self-attention, no cross keys for
    a skipped layer): the graphs leave them out and still decode PyTorch's tokens."""
    from archnet.seq2seq.hant import assemble

    student = assemble(teacher, choice)
    exported = export_seq2seq(student, tmp_path, MAX_LEN, src_len=SRC_LEN)
    translator = exported.translator()
    src = batch[0]
    expected = greedy(student, src, MAX_LEN)
    assert translator.greedy(src, MAX_LEN) == expected
    assert expected != greedy(teacher, src, MAX_LEN)  # the cut changed the function
    selfs = sum(
        name.startswith("past_k") for name in (i.name for i in translator.decoder.get_inputs())
    )
    assert selfs == sum(c in ("keep", "heads50", "ffn25", "noffn") for c in choice[2:])
