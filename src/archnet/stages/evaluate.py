"""The evaluate stage: teacher and student on the evaluation split, which no choice read.

Besides top-1 where labels exist, the student's outputs are compared with the teacher's for
any model, labelled or not; a student that drifted from its teacher is flagged loudly rather
than reported as if nothing were amiss.
"""

from __future__ import annotations

from archnet.results import EvaluationResult
from archnet.stages import common
from archnet.stages.assemble import load_student
from archnet.store import RunStore
from archnet.tasks import decisions


def run(store: RunStore) -> EvaluationResult:
    task = common.task(store)
    inputs, targets = task.inputs(store, "eval"), task.targets(store, "eval")
    t_out = task.outputs(store.teacher, inputs)
    s_out = task.outputs(load_student(store), inputs)
    teacher, student = {}, {}
    if targets is not None:
        teacher, student = task.metrics(t_out, targets), task.metrics(s_out, targets)
    agree = task.agreement(s_out, t_out)
    warnings = poor_agreement(agree)
    for w in warnings:
        common.warn(w)
    return EvaluationResult(
        images=len(inputs),
        labelled=targets is not None,
        teacher=teacher,
        student=student,
        agreement=agree,
        warnings=warnings,
    )


def poor_agreement(agree: dict[str, float]) -> list[str]:
    """Warnings for a student whose outputs no longer follow its teacher's."""
    out = []
    words, share = decisions(agree)
    if share < EvaluationResult.POOR_ARGMAX:
        what = "picks the teacher's class" if words == "same class" else f"has the {words}"
        out.append(
            f"the student {what} on only {100 * share:.1f}% "
            f"of the evaluation images (below {100 * EvaluationResult.POOR_ARGMAX:.0f}%): it "
            "no longer agrees with its teacher; train longer, or relax the budget"
        )
    if agree["relative_mse"] > EvaluationResult.POOR_RELATIVE_MSE:
        out.append(
            f"the student's outputs differ from the teacher's by {agree['relative_mse']:.2f} "
            f"relative MSE (above {EvaluationResult.POOR_RELATIVE_MSE}); train longer, or relax "
            "the budget"
        )
    return out
