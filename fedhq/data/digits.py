"""scikit-learn's bundled handwritten digits: the default dataset, no download.

1797 grayscale 8x8 images (pixel values 0..16), 10 classes, shipped inside
scikit-learn (`sklearn.datasets.load_digits`); there are no files to provide.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from .base import Dataset, build_dataset, stratified_split, subsample


def load(*, seed: int = 0, test_fraction: float = 0.2, max_train: int | None = None) -> Dataset:
    """Digits as 1x8x8 images with a seeded stratified train/test split (by default
    1437 / 360), scaled to [0, 1] and standardized with the training statistics.
    `max_train` keeps a seeded stratified subset of the training side."""
    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None]  # values 0..16 are whole numbers
    y = bunch.target.astype(np.int64)
    train, test = stratified_split(y, test_fraction, seed)
    x_train, y_train = subsample(x[train], y[train], max_train, seed, "max_train")
    return build_dataset(
        "digits",
        x_train,
        y_train,
        x[test],
        y[test],
        num_classes=10,
        class_names=[str(n) for n in bunch.target_names],
        source="sklearn.datasets.load_digits",
        max_value=16.0,
    )
