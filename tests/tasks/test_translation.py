"""The translation task: token KD over real tokens only, BLEU/chrF, same-text agreement."""

from __future__ import annotations

import pytest
import torch

from archnet.config import ConvertConfig
from archnet.errors import ArchnetError
from archnet.tasks import TokenLogits, get_task

TASK = get_task("translation")


def test_padding_positions_do_not_count():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=g)
    student = torch.randn(2, 5, 11, generator=g)
    keep = torch.tensor([[True] * 5, [True, True, False, False, False]])
    loss = TASK.distill_loss(TokenLogits(student, keep), TokenLogits(teacher, keep))
    student[1, 2:] += 100.0  # garbage where there is no token
    assert torch.allclose(
        loss, TASK.distill_loss(TokenLogits(student, keep), TokenLogits(teacher, keep))
    )
    assert loss > 0.1
    assert TASK.distill_loss(TokenLogits(teacher, keep), TokenLogits(teacher, keep)).abs() < 1e-6


def test_metrics_and_agreement():
    pytest.importorskip("sacrebleu")
    refs = ["Der Mann sieht heute die Stadt.", "Das Kind hört in der Nacht das Volk."]
    assert TASK.metrics(refs, refs)["bleu"] == pytest.approx(100.0)
    assert TASK.metrics(["Die Frau ruft.", "Der König."], refs)["bleu"] < 20
    assert TASK.agreement([refs[0], "x"], refs) == {"same_text": 50.0}


def test_image_pipeline_points_translation_elsewhere():
    with pytest.raises(ArchnetError, match="--task translation"):
        ConvertConfig(task="translation").validate()
