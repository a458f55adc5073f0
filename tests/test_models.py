"""Loading teachers from 'timm:NAME', 'zoo:NAME' and 'package.module:factory' specs."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from archnet.cli import main
from archnet.errors import ArchnetError
from archnet.models import load_model, read_state_dict
from archnet.zoo import create_model
from archnet.zoo.tiny_resnet import TinyResNet


def _perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """Weights no freshly built model has, so a successful load is observable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    return _perturbed(create_model("tiny_resnet"))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_zoo_spec_builds_eval_model() -> None:
    model = load_model("zoo:tiny_resnet")
    assert isinstance(model, TinyResNet)
    assert not model.training
    assert model.fc.out_features == 10


def test_plain_state_dict_round_trip(tmp_path: Path, trained: nn.Module, x) -> None:
    path = tmp_path / "teacher.pth"
    torch.save(trained.state_dict(), path)
    loaded = load_model("zoo:tiny_resnet", path)
    assert not loaded.training
    _assert_same_outputs(loaded, trained, x)
    with torch.no_grad():  # and it is not what an unloaded model gives
        assert not torch.allclose(load_model("zoo:tiny_resnet")(x), trained(x))


def test_wrapped_state_dict_with_module_prefix(tmp_path: Path, trained: nn.Module, x) -> None:
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert all(not k.startswith("module.") for k in read_state_dict(path))
    _assert_same_outputs(load_model("zoo:tiny_resnet", str(path)), trained, x)


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(ArchnetError, match="does not exist") as info:
        load_model("zoo:tiny_resnet", path)
    assert str(path) in str(info.value)


def test_corrupt_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"this is not a torch checkpoint\x00\x01\x02")
    with pytest.raises(ArchnetError, match="unreadable") as info:
        load_model("zoo:tiny_resnet", path)
    assert str(path) in str(info.value)


def test_checkpoint_without_tensors_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ArchnetError, match="no state dict") as info:
        load_model("zoo:tiny_resnet", path)
    assert str(path) in str(info.value)


def test_state_dict_of_another_architecture_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "effnet.pth"
    torch.save(create_model("tiny_effnet").state_dict(), path)
    with pytest.raises(ArchnetError, match="does not fit") as info:
        load_model("zoo:tiny_resnet", path)
    msg = str(info.value)
    assert str(path) in msg
    assert "missing" in msg and "unexpected" in msg


def test_wrong_shapes_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "narrow.pth"
    torch.save(create_model("tiny_resnet", channels=(16, 32, 48)).state_dict(), path)
    with pytest.raises(ArchnetError, match="wrong shape"):
        load_model("zoo:tiny_resnet", path)


def test_timm_checkpoint_with_other_class_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _perturbed(timm.create_model("resnet18", num_classes=7))
    path = tmp_path / "resnet18_7.pth"
    torch.save(source.state_dict(), path)
    model = load_model("timm:resnet18", path)
    assert model.fc.out_features == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    _assert_same_outputs(model, source, x)


@pytest.mark.parametrize("spec", ["zoo:tiny_effnet", "timm:resnet18"])
def test_checkpoint_implies_input_channels_and_classes(tmp_path: Path, spec: str) -> None:
    """A grayscale, 7-class checkpoint builds the model with 1 input channel and 7 classes."""
    if spec.startswith("zoo"):
        source = create_model("tiny_effnet", num_classes=7, in_chans=1)
    else:
        source = timm.create_model("resnet18", num_classes=7, in_chans=1)
    path = tmp_path / "gray.pth"
    torch.save(source.state_dict(), path)
    model = load_model(spec, path)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_timm_model() -> None:
    with pytest.raises(ArchnetError, match="unknown timm model 'no_such_net_xyz'"):
        load_model("timm:no_such_net_xyz")


@pytest.mark.parametrize("spec", ["resnet18", "timm:", "zoo:"])
def test_malformed_spec(spec: str) -> None:
    with pytest.raises(ArchnetError, match="not understood"):
        load_model(spec)


def test_unknown_zoo_model() -> None:
    with pytest.raises(ArchnetError, match="unknown model"):
        load_model("zoo:no_such_net")


_FACTORY_SOURCE = textwrap.dedent(
    """
    from torch import nn

    def make(num_classes=4):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(8, num_classes),
        )

    def not_a_model():
        return 42

    def broken():
        raise ValueError("no weights for\\nthis size")

    def needs_args(depth, width=8, *, act):
        return make()

    def resnet_three():
        import timm

        return timm.create_model("resnet18", num_classes=3)

    not_callable = 42
    """
)


@pytest.fixture
def factory_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pkg = tmp_path / "archnet_testpkg_factory"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(_FACTORY_SOURCE)
    (pkg / "exploding.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "archnet_testpkg_factory.nets"
    for name in [n for n in sys.modules if n.startswith("archnet_testpkg_factory")]:
        del sys.modules[name]  # the next tmp_path holds a different copy


def test_factory_spec(factory_pkg: str, tmp_path: Path) -> None:
    model = load_model(f"{factory_pkg}:make")
    assert isinstance(model, nn.Sequential) and not model.training
    assert model[-1].out_features == 4
    # and with a checkpoint of that architecture
    torch.manual_seed(0)
    source = _perturbed(load_model(f"{factory_pkg}:make"))
    path = tmp_path / "factory.pth"
    torch.save(source.state_dict(), path)
    _assert_same_outputs(load_model(f"{factory_pkg}:make", path), source, torch.randn(2, 3, 8, 8))


def test_factory_errors(factory_pkg: str) -> None:
    with pytest.raises(ArchnetError, match="cannot import model factory"):
        load_model(f"{factory_pkg}:missing_fn")
    with pytest.raises(ArchnetError, match="cannot import model factory"):
        load_model("archnet_no_such_package.mod:make")
    with pytest.raises(ArchnetError, match="not a Module"):
        load_model(f"{factory_pkg}:not_a_model")


def _assert_cli_error(capsys, tmp_path: Path, model: str, *needles: str) -> None:
    """`archnet convert --model MODEL` ends with one error line and exit code 2."""
    code = main(["convert", "--model", model, "--data", "digits", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("archnet: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_factory_that_raises(factory_pkg: str, tmp_path: Path, capsys) -> None:
    spec = f"{factory_pkg}:broken"
    with pytest.raises(ArchnetError, match="raised ValueError: no weights for this size") as info:
        load_model(spec)
    assert spec in str(info.value) and "\n" not in str(info.value)
    _assert_cli_error(capsys, tmp_path, spec, spec, "raised ValueError", "no weights")


def test_factory_that_needs_arguments(factory_pkg: str, tmp_path: Path, capsys) -> None:
    spec = f"{factory_pkg}:needs_args"
    with pytest.raises(ArchnetError, match=r"needs arguments \(depth, act\)"):
        load_model(spec)
    _assert_cli_error(capsys, tmp_path, spec, spec, "needs arguments", "defaults")


def test_factory_that_is_not_callable(factory_pkg: str, tmp_path: Path, capsys) -> None:
    spec = f"{factory_pkg}:not_callable"
    with pytest.raises(ArchnetError, match=r"is not callable \(its type is int\)"):
        load_model(spec)
    _assert_cli_error(capsys, tmp_path, spec, spec, "not callable")


def test_factory_module_that_raises_on_import(factory_pkg: str, tmp_path: Path, capsys) -> None:
    spec = "archnet_testpkg_factory.exploding:make"
    with pytest.raises(ArchnetError, match="RuntimeError: boom at import"):
        load_model(spec)
    _assert_cli_error(capsys, tmp_path, spec, "cannot import model factory", "boom at import")


def test_factory_without_num_classes_for_a_checkpoint_with_others(
    factory_pkg: str, tmp_path: Path
) -> None:
    path = tmp_path / "seven.pth"
    torch.save(timm.create_model("resnet18", num_classes=7).state_dict(), path)
    with pytest.raises(ArchnetError, match="cannot take num_classes=7"):
        load_model(f"{factory_pkg}:resnet_three", path)


def test_timm_creation_that_raises(monkeypatch, tmp_path: Path, capsys) -> None:
    def create_model(name, pretrained=False, **kwargs):
        raise TypeError(f"ResNet.__init__() got an unexpected keyword argument 'bogus' ({name})")

    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(ArchnetError, match="timm model 'resnet18' raised TypeError: .*'bogus'"):
        load_model("timm:resnet18")
    _assert_cli_error(capsys, tmp_path, "timm:resnet18", "timm model 'resnet18'", "TypeError")
