"""A small translation teacher built from scratch: joint BPE, a Marian transformer, training.

Translation students are distilled from a seq2seq teacher in the Hugging Face format, so the
teacher here is a plain `transformers` MarianMTModel with a `PreTrainedTokenizerFast`, saved
with `save_pretrained`: a user's own Marian/T5/BART folder loads through the same
`load_hf_seq2seq`. Nothing is ever downloaded: models are built from a config, folders are
loaded with `local_files_only`.

The recipe is sized for CPUs: a few million parameters, length-bucketed batches of a fixed
token budget, AdamW with warmup then cosine (or inverse-sqrt) decay, label smoothing 0.1.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from archnet.data.corpus import ParallelCorpus
from archnet.errors import ArchnetError

__all__ = [
    "MTRecipe",
    "bleu_chrf",
    "build_marian",
    "encode",
    "length_batches",
    "load_hf_seq2seq",
    "save_seq2seq",
    "seq2seq_loss",
    "train_bpe",
    "train_mt",
    "translate",
]

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2; Marian starts decoding from pad


def _hf():
    try:
        import transformers
    except ImportError:
        raise ArchnetError(
            "translation models need 'transformers'; install it with: "
            "pip install transformers tokenizers sacrebleu"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # a bar per small folder is noise
    return transformers


def train_bpe(texts: Sequence[str], vocab_size: int = 8000, min_frequency: int = 2):
    """A joint (source + target) BPE tokenizer that appends </s> to every sentence.

    Metaspace pre-tokenization (SentencePiece's '▁' word marks) decodes back to the original
    spacing, so BLEU is computed on real detokenized text.
    """
    transformers = _hf()
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, EOS, UNK]
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=512
    )


def build_marian(
    tokenizer,
    d_model: int = 128,
    layers: tuple[int, int] = (3, 3),
    heads: int = 4,
    ffn: int = 512,
    dropout: float = 0.1,
    max_positions: int = 512,
    init_std: float = 0.02,
):
    """A MarianMTModel from a config (random weights), embeddings shared by encoder, decoder
    and output layer, generation settings (start/eos/pad, no <pad> output) set explicitly.

    `init_std` is the std of every initial weight (Marian's 0.02). Larger ones (0.06, or
    Xavier with N(0, d^-1/2) embeddings) lower the loss faster at first, but at lr 3e-3 the
    post-LayerNorm encoder then collapsed to one output for every sentence.
    """
    transformers = _hf()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = transformers.MarianConfig(
        vocab_size=len(tokenizer),
        decoder_vocab_size=len(tokenizer),
        d_model=d_model,
        encoder_layers=layers[0],
        decoder_layers=layers[1],
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        dropout=dropout,
        init_std=init_std,
        max_position_embeddings=max_positions,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
        forced_eos_token_id=eos,
        bos_token_id=None,
    )
    model = transformers.MarianMTModel(config)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id = pad, eos, pad
    gen.forced_eos_token_id, gen.bad_words_ids = eos, [[pad]]
    gen.num_beams, gen.max_length = 1, max_positions
    return model


@dataclass
class MTRecipe:
    """Everything that decides a teacher's quality and its training time.

    The defaults train the demo teacher on the Bible pair: ~11 passes over the training books
    (6,000 steps of ~2,000 tokens), so dropout 0.1 regularises; a joint vocabulary of 4,000
    BPE tokens keeps the output layer, a small model's largest cost, small.
    """

    vocab_size: int = 4000
    d_model: int = 128
    layers: tuple[int, int] = (3, 3)
    heads: int = 4
    ffn: int = 512
    dropout: float = 0.1
    init_std: float = 0.02
    max_len: int = 128  # tokens per side, </s> included; longer pairs are truncated
    batch_tokens: int = 2048  # (longest side) x (pairs) per batch
    lr: float = 2e-3
    warmup: int = 400
    schedule: str = "cosine"  # or "inverse_sqrt"
    steps: int = 6000
    max_seconds: float | None = None  # stop (and end the cosine) when this time is used
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def model_kwargs(self) -> dict:
        """The keyword arguments of `build_marian` this recipe fixes."""
        keys = ("d_model", "layers", "heads", "ffn", "dropout", "init_std")
        return {k: getattr(self, k) for k in keys}


def encode(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids with </s>; longer sentences are cut to ``max_len`` (</s> kept last)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [x if len(x) <= max_len else x[: max_len - 1] + [eos] for x in ids]


def length_batches(lengths: Sequence[int], batch_tokens: int, seed: int = 0) -> list[list[int]]:
    """Indices grouped into batches of similar length, padded size <= batch_tokens.

    Sorting (with a random tie-break per call) keeps padding small; the batch order is then
    shuffled so each step sees a random length.
    """
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, lengths[i])
        if current and longest_if * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if = [], lengths[i]
        current.append(i)
        longest = longest_if
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


def _lr_factor(recipe: MTRecipe, step: int, done: float) -> float:
    """Linear warmup over `warmup` steps, then inverse square root, or cosine to 0 as `done`
    (the fraction of the steps or of the time budget used, whichever is larger) reaches 1."""
    warm = max(recipe.warmup, 1)
    if step < warm:
        return step / warm
    if recipe.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    if recipe.schedule == "inverse_sqrt":
        return math.sqrt(warm / step)
    raise ArchnetError(f"schedule {recipe.schedule!r} is unknown; use 'inverse_sqrt' or 'cosine'")


class _LinearSmoothedCE(torch.autograd.Function):
    """Output layer and label-smoothed cross-entropy (mean over rows) as one function.

    On a CPU the (tokens x vocab) logits dominate a small model's step: autograd's
    cross-entropy allocates several such tensors per step (fresh, page-faulting memory), this
    keeps one and turns it into the gradient in place: ~1.3x faster steps, same numbers.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, smoothing: float):
        logits = torch.addmm(bias, hidden, weight.t())
        lse = torch.cat([torch.logsumexp(part, -1) for part in logits.split(512)])
        target = logits.gather(1, labels[:, None]).squeeze(1)
        loss = lse - (1 - smoothing) * target - smoothing * logits.mean(-1)
        ctx.save_for_backward(hidden, weight, logits, lse, labels)
        ctx.smoothing = smoothing
        return loss.mean()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, logits, lse, labels = ctx.saved_tensors
        g = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' own memory
        g.sub_(ctx.smoothing / g.shape[1])
        g[torch.arange(len(labels)), labels] -= 1 - ctx.smoothing
        g.mul_(grad / len(labels))
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return g @ weight, g.t() @ hidden, grad_bias, None, None


def seq2seq_loss(model, input_ids, labels, pad: int, smoothing: float = 0.1) -> torch.Tensor:
    """Teacher-forced, label-smoothed loss of a Marian/BART-layout model (`model.model`,
    `lm_head`, optional `final_logits_bias`); labels are -100 at padding."""
    start = model.config.decoder_start_token_id
    decoder_input_ids = torch.full_like(labels, pad)
    decoder_input_ids[:, 0] = start
    decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)
    hidden = model.model(
        input_ids=input_ids,
        attention_mask=input_ids.ne(pad),
        decoder_input_ids=decoder_input_ids,
        use_cache=False,
    ).last_hidden_state
    keep = labels.ne(-100)
    weight = model.lm_head.weight
    bias = getattr(model, "final_logits_bias", None)
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.reshape(-1)
    return _LinearSmoothedCE.apply(hidden[keep], weight, bias, labels[keep], smoothing)


def _epochs(batches_of: Callable[[int], list[list[int]]]) -> Iterator[tuple[int, list[int]]]:
    epoch = 0
    while True:
        for batch in batches_of(epoch):
            yield epoch, batch
        epoch += 1


def train_mt(
    model,
    tokenizer,
    corpus: ParallelCorpus,
    recipe: MTRecipe,
    progress: Callable[[dict], None] | None = None,
    log_every: int = 50,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 500,
) -> list[dict]:
    """Teacher-forced training for `recipe.steps` steps (or `max_seconds`, whichever ends
    first); returns the logged records.

    `progress` receives each record: step, epoch, loss (mean over the logged steps, label
    smoothed), lr, target tokens seen, seconds elapsed (those of earlier runs included).
    With `checkpoint` (a file), the model, optimizer, step and history are saved there every
    `checkpoint_every` steps, and a later call with the same recipe resumes from it; a
    checkpoint of another recipe is an error, never silently continued.
    """
    if len(corpus) == 0:
        raise ArchnetError(f"{corpus.name} has no pairs to train on; give a non-empty corpus")
    torch.manual_seed(recipe.seed)
    src = encode(tokenizer, corpus.source, recipe.max_len)
    tgt = encode(tokenizer, corpus.target, recipe.max_len)
    lengths = [max(len(a), len(b)) for a, b in zip(src, tgt)]
    pad = tokenizer.pad_token_id
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embed_positions" not in n]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        weight_decay=0.0,
    )
    stream = _epochs(lambda e: length_batches(lengths, recipe.batch_tokens, recipe.seed + e))
    budget = recipe.max_seconds or math.inf
    history, tokens, step, before = _resume(checkpoint, recipe, model, opt)
    for _ in range(step):  # the batches the checkpointed steps saw
        next(stream)
    model.train()
    losses, t0 = [], time.perf_counter() - before
    while step < recipe.steps and time.perf_counter() - t0 < budget:
        step += 1
        elapsed = time.perf_counter() - t0
        done = max((step - recipe.warmup) / max(recipe.steps - recipe.warmup, 1), elapsed / budget)
        lr = recipe.lr * _lr_factor(recipe, step, done)
        for group in opt.param_groups:
            group["lr"] = lr
        epoch, batch = next(stream)
        input_ids = _pad([src[i] for i in batch], pad)
        labels = _pad([tgt[i] for i in batch], -100)
        loss = seq2seq_loss(model, input_ids, labels, pad, recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        tokens += int(labels.ne(-100).sum())
        last = step == recipe.steps or time.perf_counter() - t0 >= budget
        if step % log_every == 0 or last:
            record = {
                "step": step,
                "epoch": epoch,
                "loss": sum(losses) / len(losses),
                "lr": lr,
                "tokens": tokens,
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            losses = []
            if progress is not None:
                progress(record)
        if checkpoint is not None and (step % checkpoint_every == 0 or last):
            state = {"recipe": recipe.to_dict(), "step": step, "tokens": tokens}
            state |= {"history": history, "seconds": time.perf_counter() - t0}
            state |= {"model": model.state_dict(), "optimizer": opt.state_dict()}
            _save_atomic(state, Path(checkpoint))
    model.eval()
    return history


def _save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _resume(checkpoint, recipe: MTRecipe, model, opt) -> tuple[list[dict], int, int, float]:
    """(history, target tokens, step, seconds) of a checkpoint, its weights loaded; a fresh
    start when there is none."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return [], 0, 0, 0.0
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if state["recipe"] != recipe.to_dict():
        changed = sorted(k for k, v in recipe.to_dict().items() if state["recipe"].get(k) != v)
        raise ArchnetError(
            f"{checkpoint} was written with another recipe ({', '.join(changed)} changed); "
            "delete it to train afresh, or give the recipe it was written with"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["history"], state["tokens"], state["step"], state["seconds"]


@torch.no_grad()
def translate(
    model,
    tokenizer,
    sentences: Sequence[str],
    beams: int = 1,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    max_len: int = 128,
) -> list[str]:
    """Translations in input order; batches of similar length go through `model.generate`."""
    model.eval()
    ids = encode(tokenizer, sentences, max_len)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    pad = tokenizer.pad_token_id
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        input_ids = _pad([ids[i] for i in chunk], pad)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=input_ids.ne(pad),
            num_beams=beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            max_length=None,  # the saved max_length would win over, and warn about, the above
        )
        for i, text in zip(chunk, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


def bleu_chrf(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, detokenized input) and chrF."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise ArchnetError(
            "scoring translations needs 'sacrebleu'; pip install sacrebleu"
        ) from None
    if len(hyps) != len(refs):
        raise ArchnetError(f"{len(hyps)} translations for {len(refs)} references; give one each")
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(list(hyps), [list(refs)]), chrf.corpus_score(list(hyps), [list(refs)])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def save_seq2seq(model, tokenizer, folder: str | Path) -> Path:
    """Model weights, config, generation config and tokenizer, all in one folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_hf_seq2seq(folder: str | Path):
    """(model, tokenizer) from a local folder in the Hugging Face format, in eval mode.

    Only local folders: a missing path is an error, never a hub download.
    """
    transformers = _hf()
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ArchnetError(
            f"{folder} is not a saved seq2seq model (no config.json); give a folder written "
            "by save_pretrained, holding the model and its tokenizer"
        )
    try:
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArchnetError(
            f"{folder} could not be loaded as a seq2seq model and tokenizer ({first}); "
            "save both into it with save_pretrained"
        ) from None
    return model.eval(), tokenizer
