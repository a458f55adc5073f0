"""Arch-Net's restricted encoder-decoder: only the swaps change the function, padding stays out
of the BatchNorm statistics, and distillation brings the student back to its teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archnet.seq2seq.data import TokenPairs, encode, make_batches, stream, teacher_pairs
from archnet.seq2seq.distill import Seq2SeqDistillConfig, distill_seq2seq, token_kl
from archnet.seq2seq.net import Norm, from_hf
from archnet.seq2seq.restrict import MaskedBatchNorm, reset_batch_norms, restrict_seq2seq
from archnet.tokenconvert import OneHotEmbedding
from archnet.zoo.tiny_mt import load_hf_seq2seq


@pytest.fixture(scope="module")
def teacher_and_pairs(toy_mt):
    folder, tsv = toy_mt
    hf, tok = load_hf_seq2seq(folder)
    teacher = from_hf(hf)
    sources = [line.split("\t")[0] for line in tsv.read_text().splitlines()]
    pairs = teacher_pairs(teacher, encode(tok, sources, 32), 24)
    return teacher, pairs


def _kd(student, teacher, pairs: TokenPairs) -> float:
    total = 0.0
    batches = make_batches(pairs, teacher, 4096, 0)
    with torch.no_grad():
        for b in batches:
            total += float(token_kl(student(b.src, b.dec_in), teacher(b.src, b.dec_in), b.keep))
    return total / len(batches)


def test_only_restricted_modules_remain(teacher_and_pairs):
    teacher, _ = teacher_and_pairs
    student = restrict_seq2seq(teacher)
    kinds = {type(m) for m in student.modules()}
    assert Norm not in kinds and nn.SiLU not in kinds and nn.Embedding not in kinds
    assert (
        MaskedBatchNorm in kinds and nn.ReLU in kinds and isinstance(student.embed, OneHotEmbedding)
    )
    assert any(isinstance(m, Norm) for m in teacher.modules())  # the teacher is unchanged


def test_padding_stays_out_of_batch_norm_statistics(teacher_and_pairs):
    teacher, pairs = teacher_and_pairs
    student = restrict_seq2seq(teacher)
    batch = make_batches(pairs, teacher, 4096, 0)[0]
    padded = torch.cat([batch.src, torch.full((len(batch.src), 9), teacher.pad)], 1)
    reset_batch_norms(student, [(batch.src, batch.dec_in)])
    first = student.encoder[0].norm1.running_mean.clone()
    reset_batch_norms(student, [(padded, batch.dec_in)])
    torch.testing.assert_close(student.encoder[0].norm1.running_mean, first)


def test_distillation_brings_the_student_to_the_teacher(teacher_and_pairs):
    teacher, pairs = teacher_and_pairs
    student = restrict_seq2seq(teacher)
    reset_batch_norms(student, ((b.src, b.dec_in) for b in make_batches(pairs, teacher, 512, 0)))
    before = _kd(student, teacher, pairs)
    cfg = Seq2SeqDistillConfig(stage_steps=4, final_steps=40, batch_tokens=512, warmup=5)
    history = distill_seq2seq(student, teacher, stream(pairs, teacher, 512, 0), cfg)
    after = _kd(student, teacher, pairs)
    assert before > 0.05  # the swaps changed the function: there is something to learn
    assert after < 0.5 * before, (before, after)
    # one stage per target the restricted copy does not already meet (the embeddings are exact)
    assert len(history["stages"]) == 2 + 2 + 1
    assert not any("adapter" in n for n, _ in student.named_parameters())  # RFA is dropped


def test_an_interrupted_distillation_resumes_to_the_same_student(teacher_and_pairs, tmp_path):
    teacher, pairs = teacher_and_pairs
    cfg = Seq2SeqDistillConfig(stage_steps=2, final_steps=6, batch_tokens=512, warmup=2)

    def fresh():
        student = restrict_seq2seq(teacher)
        reset_batch_norms(
            student, ((b.src, b.dec_in) for b in make_batches(pairs, teacher, 512, 0))
        )
        return student

    whole = fresh()
    expected = distill_seq2seq(whole, teacher, stream(pairs, teacher, 512, 0), cfg)

    def interrupt(record: dict) -> None:
        if record["step"] == 9:
            raise KeyboardInterrupt

    ckpt = tmp_path / "student.ckpt"
    first = fresh()
    with pytest.raises(KeyboardInterrupt):
        distill_seq2seq(
            first,
            teacher,
            stream(pairs, teacher, 512, 0),
            cfg,
            on_step=interrupt,
            checkpoint=ckpt,
            checkpoint_key="k",
            checkpoint_every=4,
        )

    def run(student, key: str):
        batches = stream(pairs, teacher, 512, 0)
        return distill_seq2seq(
            student, teacher, batches, cfg, checkpoint=ckpt, checkpoint_key=key, checkpoint_every=4
        )

    resumed = fresh()
    got = run(resumed, "k")
    assert got["stages"] == pytest.approx(expected["stages"], rel=1e-5)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    other = fresh()  # a checkpoint of other settings is not continued
    run(other, "other")
    for a, b in zip(whole.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
