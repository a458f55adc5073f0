"""BatchNorm statistics move only in the modules the student changed."""

from __future__ import annotations

import copy

import torch
from torch import nn

from archnet.distill.bn import batch_norms, freeze_outside, recalibrate_bn
from archnet.distill.finetune import FinetuneConfig, finetune
from archnet.distill.losses import kd_kl


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():  # statistics from "the teacher's own data", unlike the images below
        for bn in batch_norms(net):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return net.eval()


def test_recalibration_touches_only_the_given_scopes():
    net, images = _net(), torch.randn(32, 3, 8, 8) * 3 + 1
    before = [bn.running_mean.clone() for bn in batch_norms(net)]
    recalibrate_bn(net, [images], scopes=["1"])
    kept, changed = batch_norms(net)
    assert torch.equal(kept.running_mean, before[0])
    assert not torch.equal(changed.running_mean, before[1])


def test_frozen_batch_norms_stay_in_eval_mode_while_training():
    net = _net()
    handles = freeze_outside(net, ["1"])
    net.train()
    kept = net[0][1]
    mean = kept.running_mean.clone()
    net(torch.randn(16, 3, 8, 8) * 3)
    assert torch.equal(kept.running_mean, mean) and net[1][1].training
    for h in handles:
        h.remove()


def test_a_student_equal_to_its_teacher_stays_equal():
    """Nothing changed, nothing to learn: the end-to-end stage must not move the student
    (re-estimating the teacher's statistics on other images used to)."""
    teacher, images = _net(), torch.randn(64, 3, 8, 8) * 3 + 1
    student = copy.deepcopy(teacher)
    cfg = FinetuneConfig(epochs=1, batch_size=16, weight_decay=0.0, feature_weight=0.0, shift=0)
    finetune(student, teacher, images, cfg, changed=[])
    with torch.no_grad():
        assert float(kd_kl(student(images), teacher(images))) < 1e-4
    for a, b in zip(batch_norms(student), batch_norms(teacher)):
        assert torch.equal(a.running_mean, b.running_mean)
