"""ResNet-18 with the CIFAR stem, defined here (torchvision is not a dependency).

The stem is a 3x3 stride-1 convolution with no max-pool (ImageNet's 7x7 stride-2
convolution + max-pool would shrink a 32x32 image to 8x8 before the first stage);
then four stages of two BasicBlocks (64, 128, 256, 512 channels; stride 2 and a 1x1
convolution + BatchNorm shortcut where a block changes width), global average
pooling and a linear classifier. Convolutions have no bias (BatchNorm follows each).

Names follow torchvision's resnet18 (``conv1``, ``layer2.0.downsample.0.weight``,
``fc.bias``), so state dicts match the usual CIFAR port and bench/resnet18_shapes.py:
62 parameter tensors, 11,173,962 parameters at width 64 with 10 classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18, CIFAR stem. ``width`` scales every stage (64 is the real model; a
    smaller width keeps the same 62 tensors with fewer elements, for fast tests)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError(
                f"ResNet18: num_classes, in_channels and width must be >= 1, got {num_classes}, {in_channels}, {width}"
            )
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)  # CIFAR stem
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c_in = width
        for stage, multiplier in enumerate((1, 2, 4, 8), start=1):
            c_out = width * multiplier
            stride = 1 if stage == 1 else 2
            self.add_module(f"layer{stage}", nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int | None = None) -> ResNet18:
    """ResNet-18 with the CIFAR stem. ``image_size`` is accepted for a uniform
    factory signature and ignored: global pooling makes the model size-agnostic
    (inputs of at least 8x8 keep every stage non-empty)."""
    del image_size
    return ResNet18(num_classes=num_classes, in_channels=in_channels, width=width)
