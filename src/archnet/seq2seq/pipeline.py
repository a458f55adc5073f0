"""A translation conversion as an explicit list of resumable stages over one run directory.

``prepare`` (teacher copy, splits, the teacher's own translations of the training sources)
-> ``student`` (Arch-Net: the restricted copy, progressively distilled; HANT: candidates,
latency, scores, the ILP, a fine-tune) -> ``quantize`` (one LSQ student per ``--bits``) ->
``evaluate`` (BLEU and chrF on the test split, which no choice read) -> ``export`` (encoder and
decoder-step ONNX, the target check, onnxruntime decoding against PyTorch, latency of teacher
and students in one run) -> ``report``.

Each stage writes its files, then ``stages/<stage>.json`` with the hash of the settings it read; a
resumed run skips a stage whose hash still matches and whose earlier stages were skipped.
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from archnet.errors import ArchnetError
from archnet.quant.api import QuantConfig, quantize_model
from archnet.seq2seq.config import FIXED, STAGE_ORDER, TranslationConfig
from archnet.seq2seq.corpus import load_splits
from archnet.seq2seq.data import TokenPairs, encode, make_batches, stream, teacher_pairs
from archnet.seq2seq.distill import distill_seq2seq
from archnet.seq2seq.net import Seq2SeqNet, from_hf
from archnet.seq2seq.restrict import reset_batch_norms, restrict_seq2seq
from archnet.store import RunStore, prepare_directory, read_json, write_json
from archnet.targets import load_target

__all__ = ["TranslationRun", "convert_translation", "load_teacher", "method_of"]

Log = Callable[[str], None]
CONFIG = "config.json"


def load_teacher(spec: str):
    """(Hugging Face model, tokenizer) of ``hf:DIR`` (a ``save_pretrained`` folder)."""
    from archnet.zoo.tiny_mt import load_hf_seq2seq

    folder = spec[3:] if spec.startswith("hf:") else spec
    if not folder:
        raise ArchnetError("--model for translation is hf:DIR, a save_pretrained folder")
    return load_hf_seq2seq(folder)


def method_of(target_name: str) -> str:
    """Arch-Net where the target forbids LayerNorm (a restricted chip), HANT elsewhere."""
    return "hant" if load_target(target_name).allows("LayerNormalization") else "archnet"


class TranslationRun:
    """One translation run directory: its settings, files and finished stages."""

    def __init__(self, root: str | Path, config: TranslationConfig) -> None:
        self.root = Path(root).resolve()
        self.config = config
        self._teacher: Seq2SeqNet | None = None
        self._data: dict[str, Any] | None = None
        self._tokenizer = None

    def path(self, name: str) -> Path:
        return self.root / name

    # --- teacher and data --------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load_teacher()
        return self._tokenizer

    @property
    def teacher(self) -> Seq2SeqNet:
        if self._teacher is None:
            self._load_teacher()
        return self._teacher

    def _load_teacher(self) -> None:
        hf, self._tokenizer = load_teacher(str(self.path("teacher")))
        self._teacher = from_hf(hf).eval()

    def data(self) -> dict[str, Any]:
        """``data.pt``, read once (every later stage reads it, some several times)."""
        if self._data is None:
            self._data = torch.load(self.path("data.pt"), weights_only=False)
        return self._data

    def pairs(self, split: str) -> TokenPairs:
        return TokenPairs.from_dict(self.data()[split])

    def save_model(self, name: str, model: torch.nn.Module) -> None:
        tmp = self.path(name + ".tmp")
        torch.save(model, tmp)
        tmp.replace(self.path(name))

    def load_model(self, name: str) -> Seq2SeqNet:
        return torch.load(self.path(name), weights_only=False).eval()

    def students(self) -> dict[str, str]:
        """Label -> model file of every student the run trained (float first)."""
        found = {"fp32": "student.pt"} if self.path("student.pt").is_file() else {}
        for spec in self.config.bit_list:
            if self.path(f"student_{spec}.pt").is_file():
                found[spec] = f"student_{spec}.pt"
        return found

    # --- stages ------------------------------------------------------------------------------
    def record(self, stage: str) -> dict:
        """What ``stage`` wrote when it finished (``stages/NAME.json``)."""
        return read_json(self.path(f"stages/{stage}.json"))

    def stage_record(self, stage: str) -> dict | None:
        """The stage's record if it finished with the settings in force now."""
        try:
            record = self.record(stage)
        except ValueError:
            return None
        return record if record.get("key") == self.config.key(stage) else None

    def finish(self, stage: str, record: dict, seconds: float) -> None:
        self.path("stages").mkdir(exist_ok=True)
        write_json(
            self.path(f"stages/{stage}.json"),
            {"key": self.config.key(stage), "seconds": seconds, **record},
        )


# --- stages -------------------------------------------------------------------------------------


def _prepare(run: TranslationRun, log: Log) -> dict:
    cfg = run.config
    if not run.path("teacher/config.json").is_file():
        from archnet.zoo.tiny_mt import save_seq2seq

        hf, tokenizer = load_teacher(cfg.model)
        save_seq2seq(hf, tokenizer, run.path("teacher"))
    splits = load_splits(cfg.data, cfg.eval_data)
    rng = random.Random(cfg.seed)
    train_idx = list(range(len(splits.train)))
    rng.shuffle(train_idx)
    train = [splits.train.source[i] for i in sorted(train_idx[: cfg.max_train])]
    selection = splits.selection.head(cfg.max_selection)
    test = splits.test if cfg.max_test is None else splits.test.head(cfg.max_test)
    tok, teacher = run.tokenizer, run.teacher

    def translated(name: str, sources: list[str]) -> TokenPairs:
        t0 = time.perf_counter()

        def show(done: int, total: int) -> None:
            if done == total or done % 1024 < 64:
                log(
                    f"  teacher translating {name}: {done}/{total}  {time.perf_counter() - t0:.0f} s"
                )

        return teacher_pairs(teacher, encode(tok, sources, cfg.max_len), cfg.max_new, progress=show)

    data = {
        "train": translated("train", train).to_dict(),
        "selection": translated("selection", selection.source).to_dict(),
        "test": {
            "src": encode(tok, test.source, cfg.max_len),
            "sources": test.source,
            "refs": test.target,
        },
    }
    tmp = run.path("data.pt.tmp")
    torch.save(data, tmp)
    tmp.replace(run.path("data.pt"))
    return {
        "splits": {
            "train": len(train),
            "train_available": len(splits.train),
            "selection": len(selection),
            "test": len(test),
        },
        "corpus": splits.train.name.rsplit(":", 1)[0],
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "vocab": teacher.vocab,
        "layers": [len(teacher.encoder), len(teacher.decoder)],
        "width": teacher.head.in_features,
    }


def _progress(log: Log, every: int = 50) -> Callable[[dict], None]:
    def show(r: dict) -> None:
        if r["step"] % every == 0 or r["step"] == r["steps"]:
            log(
                f"  step {r['step']}/{r['steps']}  {r['stage']}  loss {r['loss']:.4f}  "
                f"{r['seconds'] / 60:.1f} min"
            )

    return show


def _student(run: TranslationRun, log: Log) -> dict:
    cfg = run.config
    method = method_of(cfg.target)
    teacher = run.teacher
    train = run.pairs("train")
    if method == "hant":
        from archnet.seq2seq.hant_stage import run_hant

        student, record = run_hant(run, log)
    else:
        student = restrict_seq2seq(teacher)
        batches = make_batches(train, teacher, cfg.distill.batch_tokens, cfg.seed)
        used = reset_batch_norms(student, ((b.src, b.dec_in) for b in batches[:50]))
        log(f"Arch-Net student: BatchNorm statistics from {used} batches; distilling")
        history = distill_seq2seq(
            student,
            teacher,
            stream(train, teacher, cfg.distill.batch_tokens, cfg.seed),
            cfg.distill,
            seed=cfg.seed,
            on_step=_progress(log),
            checkpoint=run.path("student.ckpt"),
            checkpoint_key=cfg.key("student"),
        )
        run.path("student.ckpt").unlink(missing_ok=True)
        record = {"history": history}
    run.save_model("student.pt", student)
    params = sum(p.numel() for p in student.parameters())
    return {"method": method, "student_params": params, **record}


def _quantize(run: TranslationRun, log: Log) -> dict:
    """One LSQ student per ``--bits`` entry; one trained before with the same float student
    and schedule is kept (adding ``w2a4`` to a run does not retrain its ``w4a4``)."""
    cfg = run.config
    teacher, train = run.teacher, run.pairs("train")
    try:
        before = run.record("quantize")["quantized"]
    except (ValueError, KeyError):
        before = {}
    records = {}
    for spec in cfg.bit_list:
        key = hashlib.sha1(f"{cfg.key('student')}:{cfg.qat_steps}:{spec}".encode()).hexdigest()
        if before.get(spec, {}).get("key") == key and run.path(f"student_{spec}.pt").is_file():
            log(f"  {spec.upper()}: trained earlier with these settings, kept")
            records[spec] = before[spec]
            continue
        log(f"quantizing the student at {spec.upper()} (LSQ, {cfg.qat_steps} steps)")
        student = run.load_model("student.pt")
        quantize_model(student, QuantConfig.from_string(spec))
        calib = make_batches(train, teacher, cfg.distill.batch_tokens, cfg.seed + 7)[:4]
        student.eval()
        with torch.no_grad():
            for b in calib:
                student(b.src, b.dec_in)
        qcfg = copy.deepcopy(cfg.distill)
        qcfg.final_steps, qcfg.lr = cfg.qat_steps, cfg.distill.lr * 0.5
        history = distill_seq2seq(
            student,
            teacher,
            stream(train, teacher, qcfg.batch_tokens, cfg.seed + 1),
            qcfg,
            seed=cfg.seed,
            progressive=False,
            on_step=_progress(log),
            checkpoint=run.path(f"student_{spec}.ckpt"),
            checkpoint_key=key,
        )
        run.save_model(f"student_{spec}.pt", student)
        run.path(f"student_{spec}.ckpt").unlink(missing_ok=True)
        records[spec] = {"key": key, "history": history}
    return {"quantized": records}


def _evaluate(run: TranslationRun, log: Log) -> dict:
    from archnet.seq2seq.evaluate import evaluate_models

    return evaluate_models(run, log)


def _export(run: TranslationRun, log: Log) -> dict:
    from archnet.seq2seq.deploy import export_models

    return export_models(run, log)


def _report(run: TranslationRun, log: Log) -> dict:
    from archnet.seq2seq.report import write_report

    return write_report(run, log)


STAGES: dict[str, Callable[[TranslationRun, Log], dict]] = {
    "prepare": _prepare,
    "student": _student,
    "quantize": _quantize,
    "evaluate": _evaluate,
    "export": _export,
    "report": _report,
}
assert list(STAGES) == STAGE_ORDER


def _reconcile(root: Path, new: TranslationConfig, log: Log) -> TranslationConfig:
    """The config a resumed run goes on with: ``new``, unless it changes what fixes the data."""
    old = TranslationConfig.from_dict(read_json(root / CONFIG))
    changed = [k for k in FIXED if getattr(old, k) != getattr(new, k)]
    if changed:
        raise ArchnetError(
            f"{root} was made with other {', '.join(changed)}; these fix the run's data: "
            "start a new --out instead of --resume"
        )
    return new


def convert_translation(
    cfg: TranslationConfig, out: str | Path, resume: bool = False, log: Log = print
) -> TranslationRun:
    """Run (or resume) every stage of a translation conversion into ``out``."""
    root = Path(out)
    prepare_directory(root)
    if (root / CONFIG).is_file():
        if not resume:
            raise ArchnetError(
                f"{root} already holds a run; pass --resume to continue it, or another --out"
            )
        cfg = _reconcile(root, cfg, log)
    elif not cfg.model:
        raise ArchnetError("convert --task translation needs --model hf:DIR")
    method_of(cfg.target)  # an unknown target fails now, not after the teacher's translations
    run = TranslationRun(root, cfg)
    with RunStore(root, None).locked():  # type: ignore[arg-type]
        write_json(root / CONFIG, cfg.to_dict())
        redo = False
        for name, stage in STAGES.items():
            if not redo and run.stage_record(name) is not None:
                log(f"{name}: done earlier, kept")
                continue
            if run.path(f"stages/{name}.json").is_file():
                log(f"{name}: settings changed since it ran; running it again")
            redo = True
            log(f"{name} ...")
            t0 = time.perf_counter()
            record = stage(run, log)
            run.finish(name, record, time.perf_counter() - t0)
            log(f"{name}: {time.perf_counter() - t0:.0f} s")
    return run
