"""The demo's settings and teacher cache, without training anything."""

import pytest

from archnet.demo import demo_config, teacher_file


@pytest.mark.parametrize(
    ("target", "bits", "mode"),
    [("cpu-ort", None, "hant"), ("archnet-5op", None, "archnet"), ("cpu-ort", "w4a4", "hant")],
)
def test_every_demo_config_is_valid(target, bits, mode):
    cfg = demo_config(target=target, bits=bits)
    cfg.validate()
    assert cfg.data == "fashion-mnist"
    assert cfg.ablation == (mode == "archnet")


def test_teacher_cache_is_keyed_by_recipe_and_seed(tmp_path):
    default = teacher_file(tmp_path, 0, None)
    assert default == teacher_file(tmp_path, 0, None)
    assert default == teacher_file(tmp_path, 0, 2)  # the recipe's own epochs
    assert len({default, teacher_file(tmp_path, 1, None), teacher_file(tmp_path, 0, 1)}) == 3


@pytest.mark.parametrize("name", ["HANT", "Arch-Net", "Arch-Net W4A4"])
def test_every_vit_demo_config_is_valid(name):
    from archnet.demo_vit import CONVERSIONS, vit_config

    target, bits = CONVERSIONS[name]
    cfg = vit_config(target=target, bits=bits)
    cfg.validate()
    assert cfg.model == "zoo:tiny_vit" and cfg.bits == bits
    assert ("archnet" in cfg.candidates) == (target == "archnet-transformer")


def test_the_vit_teacher_has_its_own_cache_file(tmp_path):
    assert teacher_file(tmp_path, 0, None, "tiny_vit") != teacher_file(tmp_path, 0, None)


def test_demo_vit_refuses_an_unknown_conversion(capsys):
    from archnet.cli import main

    assert main(["demo-vit", "--only", "HANT,Puzzle"]) == 2
    err = capsys.readouterr().err
    assert "unknown conversion(s) Puzzle" in err and "Traceback" not in err
