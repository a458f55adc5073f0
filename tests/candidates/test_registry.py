"""Every registered candidate, on every reference block shape: shape, gradients, ONNX."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from archnet.blocks import BlockSpec
from archnet.candidates import (
    TEACHER,
    _registry,
    build_candidate,
    build_pool,
    get_candidate,
    list_candidates,
    register_candidate,
)
from archnet.errors import ArchnetError

SPECS = [
    BlockSpec("same", (16, 16, 16), (16, 16, 16)),
    BlockSpec("down", (16, 16, 16), (24, 8, 8)),
    BlockSpec("widen", (24, 8, 8), (40, 8, 8)),
    BlockSpec("nhwc_down", (8, 8, 16), (4, 4, 24), "nhwc"),
    BlockSpec("tokens", (17, 32), (17, 32), "tokens"),
]
SPEC_IDS = [s.name for s in SPECS]
NAMES = list_candidates()
# built from the spec alone: candidates cut from the teacher's block are tested with one
NCHW_NAMES = [
    n for n in NAMES if "nchw" in get_candidate(n).layouts and not get_candidate(n).from_teacher
]

torch.set_num_threads(1)


def _randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so eval-mode checks exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _build(name: str, spec: BlockSpec) -> nn.Module:
    model = build_candidate(name, spec)
    if model is None:
        pytest.skip(f"{name} does not apply to {spec}")
    return model


def test_enough_candidates():
    assert len(NAMES) >= 14
    families = {get_candidate(n).family for n in NAMES}
    assert {"mbconv", "fused", "resnet", "dwsep", "skip"} <= families


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_candidate_forward_backward(name, spec):
    torch.manual_seed(0)
    model = _build(name, spec).train()
    x = torch.randn(2, *spec.in_shape, requires_grad=True)
    out = model(x)
    assert out.shape == (2, *spec.out_shape)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {pname}"


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_candidate_onnx_matches_torch(name, spec):
    torch.manual_seed(0)
    model = _build(name, spec).eval()
    _randomize_bn(model)
    x = torch.randn(2, *spec.in_shape)
    with torch.no_grad():
        expected = model(x).numpy()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False)
        except TypeError:  # a torch without the ``dynamo`` keyword only has the legacy exporter
            torch.onnx.export(model, (x,), buf, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NCHW_NAMES)
def test_every_candidate_applies_to_a_downsampling_block(name):
    spec = BlockSpec("down", (16, 16, 16), (24, 8, 8))
    assert build_candidate(name, spec) is not None


@pytest.mark.parametrize(
    "spec",
    [
        BlockSpec("s4", (16, 16, 16), (32, 4, 4)),
        BlockSpec("s3", (8, 12, 12), (8, 4, 4)),
        BlockSpec("s2_same_ch", (16, 16, 16), (16, 8, 8)),
    ],
    ids=lambda s: s.name,
)
def test_any_integer_stride(spec):
    for name in NCHW_NAMES:
        model = build_candidate(name, spec)
        assert model is not None, name
        out = model.eval()(torch.randn(1, *spec.in_shape))
        assert out.shape == (1, *spec.out_shape), name


@pytest.mark.parametrize(
    "spec",
    [
        BlockSpec("fractional", (16, 16, 16), (16, 10, 10)),
        BlockSpec("upsample", (16, 8, 8), (16, 16, 16)),
        BlockSpec("fewer_tokens", (16, 32), (8, 32), "tokens"),
    ],
    ids=lambda s: s.name,
)
def test_inapplicable_specs_give_none(spec):
    for name in NAMES:
        assert build_candidate(name, spec) is None, name


def test_token_blocks_get_the_layout_free_candidates_only():
    spec = BlockSpec("tokens", (17, 32), (17, 32), "tokens")
    served = [n for n in NAMES if build_candidate(n, spec) is not None]
    assert served == ["skip", "linear"]


def test_nhwc_blocks_get_conv_candidates_in_permutes():
    """A channels-last block is served by the NCHW families, each wrapped to read and write
    channels last, so its output matches the same module run channels first."""
    spec = BlockSpec("nhwc", (8, 8, 16), (4, 4, 24), "nhwc")
    torch.manual_seed(0)
    model = build_candidate("mbconv_k3_e3_relu", spec).eval()
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        y = model(x)
        first = model.inner(x.permute(0, 3, 1, 2))
    assert y.shape == (2, 4, 4, 24)
    assert torch.equal(y, first.permute(0, 2, 3, 1))


def test_skip_is_identity_for_same_shape():
    assert isinstance(build_candidate("skip", SPECS[0]), nn.Identity)
    assert build_candidate("skip_pool", SPECS[0]) is None


def test_build_pool_teacher_first_and_copied():
    spec = SPECS[1]
    teacher = build_candidate("resnet_basic", spec)
    pool = build_pool(spec, teacher)
    assert next(iter(pool)) == TEACHER
    assert pool[TEACHER] is not teacher
    # every NCHW candidate applies to a down-sampling block, and so does the kept teacher
    assert [n for n in list(pool)[1:] if n != "archnet_teacher"] == NCHW_NAMES
    assert "archnet_teacher" in pool
    x = torch.randn(1, *spec.in_shape)
    teacher.eval(), pool[TEACHER].eval()
    torch.testing.assert_close(pool[TEACHER](x), teacher(x), rtol=0, atol=0)


def test_build_pool_filters_and_drops_inapplicable():
    spec = SPECS[0]
    teacher = build_candidate("mbconv_k3_e6_relu", spec)
    pool = build_pool(spec, teacher, ["mbconv_k5_*", "skip*"])
    assert list(pool) == [TEACHER, *list_candidates("mbconv_k5_*"), "skip"]  # skip_pool: stride 1
    assert list(build_pool(spec, teacher, "teacher")) == [TEACHER]


def test_build_pool_inherits_teacher_weights():
    spec = SPECS[1]
    torch.manual_seed(1)
    teacher = build_candidate("mbconv_k3_e6_relu", spec).eval()
    _randomize_bn(teacher)
    torch.manual_seed(2)
    student = build_pool(spec, teacher, "mbconv_k3_e6_relu")["mbconv_k3_e6_relu"].eval()
    x = torch.randn(2, *spec.in_shape)
    torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)


def test_list_candidates_patterns():
    mb = list_candidates("mbconv_*")
    assert mb and all(n.startswith("mbconv_") for n in mb)
    assert all(get_candidate(n).family == "mbconv" for n in mb)
    both = list_candidates(["skip*", "dwsep_*"])
    assert both == [n for n in NAMES if n.startswith(("skip", "dwsep_"))]  # registration order
    assert list_candidates(["skip", "skip"]) == ["skip"]
    assert list_candidates([]) == []


def test_list_candidates_exclude_and_tags():
    no_se = list_candidates("mbconv_*", exclude="*_se_*")
    assert no_se and not any("_se_" in n for n in no_se)
    se = list_candidates(tags={"se"})
    assert se and all("se" in get_candidate(n).tags for n in se)
    assert set(list_candidates(tags={"depthwise", "silu"})) <= set(list_candidates("*_silu"))


def test_unmatched_pattern_is_named():
    with pytest.raises(ArchnetError, match="mbcnv_k3"):
        list_candidates(["mbconv_*", "mbcnv_k3*"])


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ArchnetError, match="mbconv_k3_e6_relu") as err:
        get_candidate("mbconv_k3_e6_rlu")
    assert "mbconv_k3_e6_rlu" in str(err.value)
    with pytest.raises(ArchnetError, match="unknown candidate"):
        build_candidate("no_such_thing_at_all", SPECS[0])


def test_register_candidate_rules():
    with pytest.raises(ArchnetError, match="already registered"):
        register_candidate("skip", "skip")(lambda spec: None)
    with pytest.raises(ArchnetError, match="reserved"):
        register_candidate(TEACHER, "x")(lambda spec: None)


def test_register_custom_candidate():
    @register_candidate("test_custom_conv", "custom", tags={"dense"})
    def _custom(spec):
        return nn.Conv2d(spec.in_ch, spec.out_ch, 1, stride=spec.stride)

    try:
        assert list_candidates("test_custom_*") == ["test_custom_conv"]
        cdef = get_candidate("test_custom_conv")
        assert cdef.family == "custom" and cdef.tags == frozenset({"dense"})
        assert cdef.builder is _custom
        model = build_candidate("test_custom_conv", SPECS[1])
        assert model(torch.randn(1, 16, 16, 16)).shape == (1, 24, 8, 8)
    finally:
        del _registry._candidates["test_custom_conv"]


def test_blocks_down_sampling_height_and_width_apart_get_candidates():
    """A block halving only the height (audio frames, text lines) is served like any other."""
    import torch

    from archnet.blocks import BlockSpec
    from archnet.candidates import build_pool

    spec = BlockSpec("b", (8, 16, 12), (16, 8, 12))
    assert spec.stride == 0 and spec.strides == (2, 1)
    teacher = torch.nn.Conv2d(8, 16, 3, (2, 1), 1)
    pool = build_pool(spec, teacher)
    built = [n for n in pool if n != "teacher"]
    assert {"skip", "skip_pool", "mbconv_k3_e3_relu", "resnet_basic"} <= set(built), built
    assert not any(n.startswith("archnet_") for n in built)  # 3x3 stride 1 or 2 only
    x = torch.randn(2, *spec.in_shape)
    for name in built:
        assert pool[name].eval()(x).shape == (2, *spec.out_shape), name
