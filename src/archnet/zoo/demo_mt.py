"""The translation demo's teacher: a Marian EN->DE model trained on the Bible's training books.

It is trained once per recipe and cached as a `save_pretrained` folder, the same kind of
folder a user's own model comes in; an interrupted training resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from archnet.data.corpus import Splits, bible_pairs, split_by_book
from archnet.zoo.tiny_mt import MTRecipe, build_marian, save_seq2seq, train_bpe, train_mt

__all__ = ["mt_splits", "mt_teacher_cached", "mt_teacher_folder"]


def mt_splits() -> Splits:
    """English WEB -> German Schlachter 1951, split by book (train / selection / test)."""
    return split_by_book(bible_pairs("4", "s"))


def mt_teacher_folder(out: Path, recipe: MTRecipe) -> Path:
    """Where the teacher of this recipe is cached: a changed recipe trains a new one."""
    digest = hashlib.sha1(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()
    return Path(out) / f"teacher-mt-{digest[:10]}"


def mt_teacher_cached(
    out: Path, recipe: MTRecipe | None = None, splits: Splits | None = None, log=print
) -> tuple[Path, dict]:
    """(folder, training record) of the demo teacher, trained here unless already cached.

    The record holds the recipe, the training seconds (all runs of an interrupted training
    together) and the logged losses; it is saved next to the model as `training.json`.
    """
    recipe = recipe or MTRecipe()
    folder = mt_teacher_folder(out, recipe)
    record_file = folder / "training.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        log(f"teacher reusing {folder} (trained in {record['seconds'] / 60:.1f} min)")
        return folder, record
    splits = splits or mt_splits()
    work = folder.with_name(folder.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import PreTrainedTokenizerFast

    if (work / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(work, local_files_only=True)
    else:
        train = splits.train
        tokenizer = train_bpe(train.source + train.target, recipe.vocab_size)
        tokenizer.save_pretrained(work)
    torch.manual_seed(recipe.seed)
    model = build_marian(tokenizer, **recipe.model_kwargs())
    log(
        f"teacher training a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter "
        f"Marian on {len(splits.train)} verse pairs ({recipe.steps} steps)"
    )

    def show(r: dict) -> None:
        log(
            f"  step {r['step']}/{recipe.steps}  epoch {r['epoch']}  loss {r['loss']:.3f}  "
            f"{r['seconds'] / 60:.1f} min"
        )

    history = train_mt(
        model,
        tokenizer,
        splits.train,
        recipe,
        progress=show,
        log_every=250,
        checkpoint=work / "train.ckpt",
    )
    save_seq2seq(model, tokenizer, work)
    record = {"recipe": recipe.to_dict(), "seconds": history[-1]["seconds"], "history": history}
    (work / "training.json").write_text(json.dumps(record, indent=1))
    (work / "train.ckpt").unlink()
    work.replace(folder)
    log(f"teacher trained in {record['seconds'] / 60:.1f} min -> {folder}")
    return folder, record
