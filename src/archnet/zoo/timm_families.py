"""The timm CNN families archnet is checked on (random weights, 64x64 inputs, archnet-5op):
one list that ``tests/test_plan.py`` pins and ``bench/bench_archnet_timm.py`` converts."""

from __future__ import annotations

FAMILIES = [
    "resnet18",
    "resnext26ts",
    "cspresnet50",
    "cspdarknet53",
    "repvgg_a0",
    "dla34",
    "densenet121",
    "hrnet_w18_small",
    "ghostnet_100",
    "mixnet_s",
    "rexnet_100",
    "mobilenetv2_100",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "efficientnet_lite0",
    "regnetx_002",
    "vgg11",
    "mnasnet_100",
    "lcnet_050",
    "convnext_atto",
    "tinynet_e",
    "dpn48b",
]

# families whose blocks archnet does not find (no container level maps one tensor to one)
NO_BLOCKS: set[str] = set()

# families whose blocks are found but whose glue archnet-5op cannot run, with an operator the
# refusal names: HRNet's branch fusion up-samples (Resize) and sums lists of branches
GLUE_LEFT = {"hrnet_w18_small": "Resize"}

# what a plan is expected to accept: the rest
CONVERTIBLE = [n for n in FAMILIES if n not in NO_BLOCKS and n not in GLUE_LEFT]
