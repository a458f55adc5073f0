"""Greedy and beam decoding of a :class:`~archnet.seq2seq.net.Seq2SeqNet`, with a key/value cache.

Decoding follows what ``transformers`` generation does for the teacher (start token, the pad
token never produced, stop at </s>, </s> forced at the last allowed step), so a faithful copy
of the teacher decodes to the teacher's own tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archnet.seq2seq.net import Seq2SeqNet, additive_mask

__all__ = ["beam_search", "greedy", "pad_batch"]


def pad_batch(seqs: list[list[int]], value: int) -> Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _allowed(logits: Tensor, net: Seq2SeqNet, step: int, max_new: int) -> Tensor:
    logits = logits.clone()
    logits[:, net.pad] = float("-inf")
    if step == max_new - 1:  # the last step may only end the sentence
        forced = torch.full_like(logits, float("-inf"))
        forced[:, net.eos] = 0.0
        logits = forced
    return logits


@torch.no_grad()
def greedy(net: Seq2SeqNet, src: Tensor, max_new: int = 160) -> list[list[int]]:
    """Token ids (</s> included, start token excluded) for each row of padded ``src``."""
    net.eval()
    keep = src.ne(net.pad)
    memory = net.encode(src, keep)
    cross, cross_mask = net.cross_kv(memory), additive_mask(keep)
    b = src.shape[0]
    token = torch.full((b, 1), net.start, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(b)]
    past = None
    for t in range(min(max_new, net.max_positions)):
        logits, past = net.step(token, t, cross, cross_mask, past)
        nxt = _allowed(logits, net, t, min(max_new, net.max_positions)).argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            out[i].append(int(nxt[i]))
        done |= nxt.eq(net.eos)
        if bool(done.all()):
            break
        token = nxt.masked_fill(done, net.pad)[:, None]
    return out


@torch.no_grad()
def beam_search(
    net: Seq2SeqNet, src: Tensor, beams: int = 4, max_new: int = 160, length_penalty: float = 1.0
) -> list[list[int]]:
    """Beam search per sentence (``beams`` hypotheses; finished ones scored by summed log
    probability / length ** ``length_penalty``, as ``transformers`` does)."""
    net.eval()
    results = []
    limit = min(max_new, net.max_positions)
    for row in src:
        row = row[row.ne(net.pad)][None]
        keep = torch.ones_like(row, dtype=torch.bool)
        memory = net.encode(row, keep)
        cross = [
            (k.expand(beams, -1, -1, -1), v.expand(beams, -1, -1, -1))
            for k, v in net.cross_kv(memory)
        ]
        cross_mask = additive_mask(keep.expand(beams, -1))
        scores = torch.full((beams,), float("-inf"))
        scores[0] = 0.0  # all beams start equal: keep one so the first step is not repeated
        seqs = [[] for _ in range(beams)]
        token = torch.full((beams, 1), net.start, dtype=torch.long)
        finished: list[tuple[float, list[int]]] = []
        past = None
        for t in range(limit):
            logits, past = net.step(token, t, cross, cross_mask, past)
            logp = _allowed(logits, net, t, limit).log_softmax(-1) + scores[:, None]
            top, idx = logp.flatten().topk(2 * beams)
            vocab = logp.shape[1]
            keep_beams, new_scores, new_seqs = [], [], []
            for score, flat in zip(top.tolist(), idx.tolist()):
                beam, tok = divmod(flat, vocab)
                if score == float("-inf"):
                    continue
                if tok == net.eos:
                    seq = seqs[beam] + [tok]
                    finished.append((score / len(seq) ** length_penalty, seq))
                elif len(keep_beams) < beams:
                    keep_beams.append(beam)
                    new_scores.append(score)
                    new_seqs.append(seqs[beam] + [tok])
            best_done = max((s for s, _ in finished), default=float("-inf"))
            if not keep_beams or (
                len(finished) >= beams and max(new_scores) / (t + 1) ** length_penalty < best_done
            ):
                break
            while len(keep_beams) < beams:  # fewer live candidates than beams: pad with dead
                keep_beams.append(keep_beams[0])
                new_scores.append(float("-inf"))
                new_seqs.append(list(new_seqs[0]))
            index = torch.tensor(keep_beams)
            past = [(k[index], v[index]) for k, v in past]
            scores = torch.tensor(new_scores)
            seqs = new_seqs
            token = torch.tensor([s[-1] for s in seqs])[:, None]
        results.append(max(finished, key=lambda f: f[0])[1] if finished else seqs[0])
    return results
