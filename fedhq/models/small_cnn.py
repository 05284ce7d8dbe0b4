"""A small CNN for quick federated runs on 8x8 (scikit-learn digits), 28x28 (MNIST-like)
and 32x32 (CIFAR/SVHN) images.

    conv3x3(C -> w) - ReLU - maxpool2 - conv3x3(w -> 2w) - ReLU - maxpool2
    - flatten - linear(2w * (H//4) * (W//4) -> hidden) - ReLU - linear(hidden -> classes)

No BatchNorm, so every trainable tensor is a weight or a bias of a Conv2d / Linear:
QAT preparation quantizes all of them. With w = 32, hidden = 128 it has about 53k
parameters at 8x8x1, 422k at 28x28x1 and 545k at 32x32x3.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SmallCNN(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 32, hidden: int = 128
    ):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"SmallCNN: image_size must be >= 4 (two 2x2 poolings), got {image_size}")
        if min(num_classes, in_channels, width, hidden) < 1:
            raise ValueError(
                "SmallCNN: num_classes, in_channels, width and hidden must be >= 1, "
                f"got {num_classes}, {in_channels}, {width}, {hidden}"
            )
        self.image_size = image_size
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        side = image_size // 2 // 2
        self.fc1 = nn.Linear(2 * width * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"SmallCNN was built for {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}"
            )
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def small_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 32) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
