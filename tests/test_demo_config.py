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
