"""The export stage of a translation run: the graphs a chip runs, checked, decoded, timed.

Every model (teacher and students) is exported as an encoder and a decoder-step graph at a
fixed source length (``max_len``: the test sources are padded to it) and a fixed cache;
students are checked against the run's target (the teacher too, for reference). onnxruntime
decodes the test split greedily and its tokens are compared with PyTorch's, sentence by
sentence. Latency: teacher and students translate the same batch of test sentences in this
one process, in interleaved rounds (onnxruntime CPU, 1 thread, graphs exported at the batch's
own width), so their ratio compares like with like.
"""

from __future__ import annotations

from collections.abc import Callable

from archnet.quant.api import is_quantized
from archnet.seq2seq.data import by_length
from archnet.seq2seq.decode import pad_batch
from archnet.seq2seq.evaluate import decode_all
from archnet.seq2seq.onnx import check_seq2seq, export_seq2seq
from archnet.seq2seq.timing import latency_sample, time_translations
from archnet.targets import load_target

__all__ = ["REMOVED_OPS", "export_models"]

# what Arch-Net removes from a Transformer: none may remain in an Arch-Net student's graphs
REMOVED_OPS = ("LayerNormalization", "Gelu", "Erf", "Gather")


def _ops(paths) -> list[str]:
    """Operator types of the graphs as a compiler keeps them (constant subgraphs, such as a
    bias put on its integer grid, folded; aliases dropped)."""
    import onnx

    from archnet.targets.graph import Graph

    return sorted({n.op_type for p in paths for n in Graph(onnx.load(str(p))).kept_nodes()})


def _ort_tokens(exported, src: list[list[int]], pad: int, max_new: int, optimize: bool):
    translator = exported.translator(optimize=optimize)
    return by_length(src, lambda b: translator.greedy(b, max_new), pad)


def export_models(run, log: Callable[[str], None]) -> dict:
    """Export, check, decode and time the teacher and every student of ``run``."""
    cfg = run.config
    target = load_target(cfg.target)
    test = run.data()["test"]
    models = {"teacher": run.teacher}
    models |= {label: run.load_model(file) for label, file in run.students().items()}
    src_len = max(len(s) for s in test["src"])
    sample = latency_sample(test["src"], cfg.latency_batch)
    batch = pad_batch([test["src"][i] for i in sample], run.teacher.pad)
    record: dict[str, dict] = {}
    for label, net in models.items():
        folder = run.path(f"onnx/{label}")
        exported = export_seq2seq(net, folder, cfg.max_new, src_len=src_len)
        reports = check_seq2seq(exported, target)
        violations = sum(len(r.violations) for r in reports.values())
        unverified = sum(len(r.unverified) for r in reports.values())
        ops = _ops([exported.encoder, exported.decoder])
        torch_tokens = decode_all(net, test["src"], cfg.max_new)
        quantized = is_quantized(net)
        # QDQ as written is the fake quantization; optimised, onnxruntime also rounds biases
        # onto the integer accumulator grid (as an integer chip does), which moves logits
        ort_tokens = _ort_tokens(
            exported, test["src"], net.pad, cfg.max_new, optimize=not quantized
        )
        same = sum(a == b for a, b in zip(ort_tokens, torch_tokens))
        entry = {
            "files": [
                str(exported.encoder.relative_to(run.root)),
                str(exported.decoder.relative_to(run.root)),
            ],
            "bytes": exported.encoder.stat().st_size + exported.decoder.stat().st_size,
            "violations": violations,
            "unverified": unverified,
            "ops": ops,
            "removed_ops_left": [op for op in REMOVED_OPS if op in ops],
            "quantized": quantized,
            "tokens_match": same == len(torch_tokens),
            "tokens_match_share": 100.0 * same / max(len(torch_tokens), 1),
        }
        if quantized:
            optimised = _ort_tokens(exported, test["src"], net.pad, cfg.max_new, optimize=True)
            entry["tokens_match_share_optimized"] = (
                100.0
                * sum(a == b for a, b in zip(optimised, torch_tokens))
                / max(len(torch_tokens), 1)
            )
        record[label] = entry
        log(
            f"  {label}: {violations} violations on {target.name}, ORT tokens = PyTorch on "
            f"{entry['tokens_match_share']:.1f}% of {len(torch_tokens)} sentences"
        )
    # teacher and students timed in interleaved rounds, on the same batch (archnet.seq2seq.timing)
    timed = time_translations(models, batch, cfg.max_new, rounds=cfg.latency_repeats)
    for label, t in timed.items():
        entry = record[label]
        entry |= {
            "encoder_ms": t.encoder_ms,
            "step_ms": t.step_ms,
            "translation_ms": t.translate_ms,
            "steps": t.steps,
        }
        if label != "teacher":
            entry["latency_ratio"] = t.ratio
            entry["speedup"] = 1.0 / t.ratio
        log(
            f"  {label}: translation of {len(batch)} sentences {t.translate_ms:.1f} ms "
            f"({t.steps} steps)"
            + ("" if label == "teacher" else f", {t.ratio:.2f}x the teacher's time")
        )
    return {
        "models": record,
        "src_len": src_len,
        "max_len": cfg.max_new,
        "latency_batch": list(batch.shape),
        "latency": "onnxruntime CPU, 1 thread, interleaved rounds after warm-up, same process; "
        "ratios: median of per-round ratios",
    }
