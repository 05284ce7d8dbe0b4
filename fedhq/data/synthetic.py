"""A seeded synthetic image classification task for benchmarks; no files.

Each class has a smooth random mean image (random values on a coarse grid, upsampled
bilinearly); a sample is its class's mean plus independent Gaussian pixel noise of
standard deviation 1. Mean images are scaled so two class means lie about
`class_sep` noise standard deviations apart whatever the image size, so the task is
learnable but, at the default 4.0, not trivial: two classes overlap with probability
about Phi(-class_sep / 2) = 2.3%, and a nearest-class-mean classifier on 4x4-pooled
images scores about 80% on the default 3x32x32 task (98% at class_sep 6), measured.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedhq_kernels.checks import is_int, is_real

from .base import Dataset, build_dataset


def _positive_int(name: str, value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"synthetic: {name} must be a positive integer, got {value!r}")
    return value


def load(
    *,
    seed: int = 0,
    num_classes: int = 10,
    num_train: int = 2000,
    num_test: int = 500,
    channels: int = 3,
    image_size: int = 32,
    class_sep: float = 4.0,
) -> Dataset:
    """`num_train` / `num_test` images of `channels` x `image_size` x `image_size` in
    `num_classes` balanced classes; the same seed gives the same tensors."""
    for name in ("num_classes", "num_train", "num_test", "channels", "image_size"):
        _positive_int(name, locals()[name])
    if num_classes < 2:
        raise ValueError(f"synthetic: num_classes must be at least 2, got {num_classes}")
    if not (is_real(class_sep) and class_sep > 0):
        raise ValueError(f"synthetic: class_sep must be a positive number, got {class_sep!r}")
    g = torch.Generator().manual_seed(int(seed))
    coarse = max(2, image_size // 4)
    means = torch.randn(num_classes, channels, coarse, coarse, generator=g, dtype=torch.float64)
    means = F.interpolate(means, size=(image_size, image_size), mode="bilinear", align_corners=False)
    # Near-orthogonal means of norm sep/sqrt(2) are about sep apart.
    means *= class_sep / math.sqrt(2) / means.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def draw(n: int):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = means[y] + torch.randn(n, channels, image_size, image_size, generator=g, dtype=torch.float64)
        return x.to(torch.float32), y.numpy()

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    return build_dataset(
        "synthetic",
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=num_classes,
        class_names=None,
        source=f"generated (seed {seed}, class_sep {class_sep})",
    )
