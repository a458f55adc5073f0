"""The generic block rule (archnet.chains): plain stacks grouped into blocks without changing
a value or the run's fingerprint, and the deepest containers that chain their children."""

from __future__ import annotations

import torch
from torch import nn

from archnet.blocks import find_blocks
from archnet.chains import LayerGroup, plain_runs
from archnet.stages.prepare import fingerprint


class _ConvMlp(nn.Module):
    """A conv MLP that pools first (timm VGG's ``pre_logits``): not a chain of its children."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = nn.Conv2d(8, 16, 2), nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(nn.functional.adaptive_avg_pool2d(x, 2))))


class _TinyVGG(nn.Module):
    """VGG's layout: one flat ``features`` stack of convs, in-place ReLUs and pools."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pre_logits = _ConvMlp()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(self.features(x)))


def test_a_plain_stack_is_grouped_into_one_block_per_pool() -> None:
    torch.manual_seed(0)
    model, x = _TinyVGG().eval(), torch.randn(2, 3, 16, 16)
    before, names, want = model(x), list(model.state_dict()), fingerprint(model, {})
    specs = find_blocks(model, (3, 16, 16))
    assert [s.name for s in specs] == ["features.0", "features.1", "pre_logits"]
    assert [(s.in_shape, s.out_shape) for s in specs[:2]] == [
        ((3, 16, 16), (4, 8, 8)),
        ((4, 8, 8), (8, 4, 4)),
    ]
    assert isinstance(model.features[1], LayerGroup) and len(model.features[1]) == 5
    torch.testing.assert_close(model(x), before)  # grouping changes no value
    assert fingerprint(model, {}) == want  # nor the run's fingerprint (original names)
    assert list(model.state_dict()) != names
    # grouped once: found again (a resumed run's stored teacher) by the same names
    assert [s.name for s in find_blocks(model, (3, 16, 16))] == [s.name for s in specs]


def test_a_stack_without_pools_is_cut_at_each_conv() -> None:
    convs = [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()] * 3
    assert plain_runs(nn.Sequential(*convs)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert plain_runs(nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU())) == []  # one conv: a layer


class _Split(nn.Module):
    """Children not run in sequence (a split and a concat): never descended into."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)[:, : x.shape[1]] + x


class _Chained(nn.Module):
    """DPN's layout: a ``features`` stack of blocks with a bare pool among them, which stops
    the ``features.*`` pattern (it reaches a single layer); the generic rule takes the blocks."""

    def __init__(self) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.features = nn.Sequential(
            stem, nn.MaxPool2d(2), _Split(8), _Split(8), nn.BatchNorm2d(8)
        )
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def test_the_generic_rule_takes_the_deepest_chained_containers() -> None:
    specs = find_blocks(_Chained().eval(), (3, 16, 16))
    assert [s.name for s in specs] == ["features.0", "features.2", "features.3"]
    assert specs[1].in_shape == specs[1].out_shape == (8, 8, 8)
