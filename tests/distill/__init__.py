"""Shared pieces of the distillation tests."""

import torch
from torch import nn

from archnet.data import ImageData
from archnet.zoo import create_model
from archnet.zoo.train import recalibrate_bn


def calibrated_tiny_resnet(images: torch.Tensor) -> nn.Module:
    """tiny_resnet with input-dependent predictions and BatchNorm calibrated on the images."""
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
        model.fc.weight.normal_(0.0, 0.3)
    recalibrate_bn(model, ImageData(images))
    return model.eval()
