"""Target profiles: built-ins load, user files load, and malformed files name the bad key."""

from dataclasses import replace
from pathlib import Path

import pytest
import tomli_w

from archnet.errors import ArchnetError
from archnet.targets import Target, list_targets, load_target
from archnet.targets.latency import LatencyBackend
from archnet.targets.target import Rules

BUILTINS = {
    "cpu-ort",
    "cpu-torch",
    "cuda-torch",
    "cuda-ort",
    "archnet-5op",
    "archnet-5op-int",
    "openvino-cpu",
}

GOOD = """
name = "my-npu"
description = "Convs and ReLUs only"

[latency]
backend = "torch"
device = "cpu"
threads = 2
batch_size = 4

[ops]
allowed = ["Conv", "Relu", "Add"]

[rules]
conv_kernel_shapes = [[1, 1], [3, 3]]
conv_strides = [[1, 1], [2, 2]]
conv_dilations = [[1, 1]]
conv_groups = "depthwise"
pool_kernel_shapes = [[2, 2]]
pool_strides = [[2, 2]]
max_channels = 512
"""


def write(tmp_path: Path, text: str, name: str = "t.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_builtins_load() -> None:
    targets = {t.name: t for t in list_targets()}
    assert set(targets) >= BUILTINS
    cpu = load_target("cpu-ort")
    assert (cpu.backend, cpu.device, cpu.threads, cpu.batch_size) == ("onnxruntime", "cpu", 1, 1)
    assert cpu.allowed_ops is None and cpu.allows("AnyOp")
    assert cpu.source == "built-in"
    assert targets["cuda-torch"].device == "cuda"
    assert targets["cuda-ort"].backend == "onnxruntime"
    assert load_target(cpu) is cpu


@pytest.mark.parametrize("name", ["cpu-ort", "cpu-torch"])
def test_cpu_builtins_give_backend(name: str) -> None:
    backend = load_target(name).latency_backend()
    assert isinstance(backend, LatencyBackend)
    assert backend.device == "cpu" and backend.threads == 1


def test_user_toml_loads_and_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    target = load_target(str(path))
    assert target.name == "my-npu"
    assert (target.backend, target.device, target.threads, target.batch_size) == (
        "torch",
        "cpu",
        2,
        4,
    )
    assert target.allowed_ops == frozenset({"Conv", "Relu", "Add"})
    assert target.allows("Conv") and not target.allows("Softmax")
    assert target.rules == Rules(
        conv_kernel_shapes=((1, 1), (3, 3)),
        conv_strides=((1, 1), (2, 2)),
        conv_dilations=((1, 1),),
        conv_groups="depthwise",
        pool_kernel_shapes=((2, 2),),
        pool_strides=((2, 2),),
        max_channels=512,
    )
    assert target.to_dict()["rules"]["conv_kernel_shapes"] == [[1, 1], [3, 3]]
    assert target.source == str(path)
    again = load_target(write(tmp_path, tomli_w.dumps(target.to_dict()), "again.toml"))
    assert again == Target(**{**target.__dict__, "source": again.source})


def test_defaults_fill_optional_keys(tmp_path: Path) -> None:
    target = load_target(write(tmp_path, 'name = "x"\n[latency]\nbackend = "onnxruntime"\n'))
    assert (target.device, target.threads, target.batch_size, target.allowed_ops) == (
        "cpu",
        1,
        1,
        None,
    )


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(ArchnetError, match="cpu-ort") as err:
        load_target("no-such-chip")
    assert "no-such-chip" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArchnetError, match="not found"):
        load_target(str(tmp_path / "absent.toml"))


def test_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "x\n')
    with pytest.raises(ArchnetError, match="TOML syntax error") as err:
        load_target(path)
    assert str(path) in str(err.value)


def test_unavailable_cuda_backend_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ArchnetError, match="available: cpu"):
        load_target("cuda-torch").latency_backend()


MALFORMED = {
    "missing name": (GOOD.replace('name = "my-npu"', ""), "missing required key name"),
    "empty name": (GOOD.replace('"my-npu"', '""'), "name must be"),
    "missing backend": (GOOD.replace('backend = "torch"', ""), "latency.backend"),
    "unknown backend": (GOOD.replace('"torch"', '"tvm"'), "latency.backend"),
    "bad device": (GOOD.replace('"cpu"', '"tpu"'), "latency.device"),
    "zero threads": (
        GOOD.replace("threads = 2", "threads = 0"),
        "latency.threads must be a positive integer",
    ),
    "string threads": (GOOD.replace("threads = 2", 'threads = "2"'), "latency.threads"),
    "bool batch": (GOOD.replace("batch_size = 4", "batch_size = true"), "latency.batch_size"),
    "ops not a list": (GOOD.replace('["Conv", "Relu", "Add"]', '"Conv"'), "ops.allowed"),
    "torch op name": (GOOD.replace('"Conv"', '"Conv2d"'), "ops.allowed.*Conv2d"),
    "typo key": (GOOD.replace("threads = 2", "thread = 2"), "latency.thread"),
    "unknown top key": ("foo = 1\n" + GOOD, "unknown key foo"),
    "latency not a table": ('name = "x"\nlatency = 3\n', r"\[latency\]"),
    "rules not a table": ("rules = 1\n" + GOOD.split("[rules]")[0], "rules must be"),
    "unknown rule": (GOOD.replace("max_channels", "max_chanels"), "unknown key rules.max_chanels"),
    "kernel not pairs": (
        GOOD.replace("[[1, 1], [3, 3]]", "[3, 3]"),
        r"rules.conv_kernel_shapes must be a list of \[h, w\] pairs",
    ),
    "kernel triple": (GOOD.replace("[[1, 1], [3, 3]]", "[[3, 3, 3]]"), "rules.conv_kernel_shapes"),
    "zero stride": (GOOD.replace("[[1, 1], [2, 2]]", "[[0, 1]]"), "rules.conv_strides"),
    "dilations not a list": (GOOD.replace("[[1, 1]]", '"1x1"', 1), "rules.conv_dilations"),
    "groups sometimes": (
        GOOD.replace('"depthwise"', '"sometimes"'),
        "rules.conv_groups must be one of dense, depthwise, any",
    ),
    "pool strides float": (
        GOOD.replace("pool_strides = [[2, 2]]", "pool_strides = [[2.0, 2]]"),
        "rules.pool_strides",
    ),
    "channels negative": (
        GOOD.replace("max_channels = 512", "max_channels = -1"),
        "rules.max_channels must be a positive integer",
    ),
    "channels bool": (
        GOOD.replace("max_channels = 512", "max_channels = true"),
        "rules.max_channels",
    ),
    "quantized_only string": (
        GOOD + 'quantized_only = "yes"\n',
        "rules.quantized_only must be true or false",
    ),
    "quantized_only int": (GOOD + "quantized_only = 1\n", "rules.quantized_only"),
    "quant points": (GOOD + '[quant]\npoints = "outputs"\n', "quant.points must be one of"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_names_key_and_file(tmp_path: Path, case: str) -> None:
    text, pattern = MALFORMED[case]
    path = write(tmp_path, text)
    with pytest.raises(ArchnetError, match=pattern) as err:
        load_target(path)
    assert str(path) in str(err.value)


def test_archnet_5op_profile() -> None:
    target = load_target("archnet-5op")
    assert "Arch-Net" in target.description
    assert (target.backend, target.device, target.threads, target.batch_size) == (
        "onnxruntime",
        "cpu",
        1,
        1,
    )
    assert target.allowed_ops == frozenset(
        {
            "Conv",
            "MaxPool",
            "BatchNormalization",
            "Gemm",
            "Concat",
            "Relu",
            "GlobalAveragePool",
            "Flatten",
            "Reshape",
        }
    )
    assert target.rules == Rules(
        conv_kernel_shapes=((3, 3),),
        conv_strides=((1, 1), (2, 2)),
        conv_dilations=((1, 1),),
        conv_groups="dense",
        pool_kernel_shapes=((2, 2),),
        pool_strides=((2, 2),),
    )
    assert target.rules and not load_target("cpu-ort").rules


def test_rules_round_trip_keeps_unset_rules_out(tmp_path: Path) -> None:
    text = GOOD.split("[rules]")[0] + '[rules]\nconv_groups = "any"\n'
    target = load_target(write(tmp_path, text))
    assert target.rules == Rules(conv_groups="any")
    assert target.to_dict()["rules"] == {"conv_groups": "any"}
    again = load_target(write(tmp_path, tomli_w.dumps(target.to_dict()), "again.toml"))
    assert again.rules == target.rules
    assert "rules" not in load_target("cpu-ort").to_dict()


def test_every_rule_key_is_a_rules_field() -> None:
    from dataclasses import fields

    from archnet.targets.target import _RULES

    assert set(_RULES) == {f.name for f in fields(Rules)}


def test_archnet_5op_int_is_archnet_5op_for_integer_chips() -> None:
    base, integer = load_target("archnet-5op"), load_target("archnet-5op-int")
    assert integer.rules == replace(base.rules, quantized_only=True)
    assert integer.allowed_ops == base.allowed_ops
    # no runtime here runs 2-8-bit integer kernels: the chip's latency is a cost model's
    assert integer.estimated and integer.backend == "bitops" and not base.estimated
    assert "integer" in integer.description and integer.description != base.description
    assert not base.rules.quantized_only


@pytest.mark.parametrize("value", [True, False])
def test_quantized_only_round_trips(tmp_path: Path, value: bool) -> None:
    text = GOOD.split("[rules]")[0] + f"[rules]\nquantized_only = {str(value).lower()}\n"
    target = load_target(write(tmp_path, text))
    assert target.rules == Rules(quantized_only=value)
    assert bool(target.rules) is value  # false is the default: nothing is enforced
    assert target.to_dict().get("rules") == ({"quantized_only": True} if value else None)
    again = load_target(write(tmp_path, tomli_w.dumps(target.to_dict()), "again.toml"))
    assert again.rules == target.rules


def test_quantization_points_are_the_targets_and_round_trip(tmp_path: Path) -> None:
    assert load_target("cpu-ort").requantize  # onnxruntime fuses integer kernels with them
    openvino = load_target("openvino-cpu")
    assert not openvino.requantize and openvino.quant_points == "inputs"
    path = tmp_path / "ov.toml"
    path.write_text(tomli_w.dumps(openvino.to_dict()))
    assert load_target(path).quant_points == "inputs"
    assert "quant" not in load_target("cpu-ort").to_dict()  # the default is left out
