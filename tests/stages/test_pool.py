"""The candidates stage: blocks no family serves are named, and a run where none can change is
refused before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archnet import ArchnetError, convert
from archnet.blocks import BlockSpec
from archnet.stages.pool import _check_served, _why_unserved
from tests.conftest import tiny_config


class _TokenBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Tokens(nn.Module):
    """A Transformer-shaped classifier: patch embedding, token blocks, mean pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.blocks = nn.Sequential(*[_TokenBlock(16) for _ in range(3)])
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))


def test_token_blocks_without_a_serving_family_are_refused_with_the_reason(tmp_path):
    """Only skip and linear serve token blocks; with neither selected nothing can change."""
    config = tiny_config(candidates="dwsep_k3_relu,resnet_basic_w05")
    with pytest.raises(ArchnetError, match="for its tokens shapes"):
        convert(_Tokens().eval(), torch.randn(20, 3, 32, 32), out=tmp_path / "r", config=config)
    assert not (tmp_path / "r" / "features").exists()  # refused before the teacher's features


def test_one_unserved_block_is_a_warning_naming_it(capsys):
    _check_served({"blocks.3": "it does not down-sample by an integer factor"}, n_blocks=4)
    err = capsys.readouterr().err
    assert "blocks.3" in err and "stays the teacher's" in err


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (BlockSpec("b", (4, 16), (4, 16), "tokens"), "for its tokens shapes"),
        (BlockSpec("b", (4, 16), (2, 16), "tokens"), "changes length"),
        (BlockSpec("b", (8, 9, 9), (8, 4, 4)), "integer factor"),
        (BlockSpec("b", (8, 8, 8), (8, 8, 8)), "widen --candidates"),
    ],
)
def test_why_a_block_is_unserved(spec, words):
    assert words in _why_unserved(spec, {})
