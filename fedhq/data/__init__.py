"""Datasets and federated partitioners.

    from fedhq.data import load_dataset, partition, label_histograms
    data = load_dataset("digits", seed=0)          # bundled with scikit-learn
    parts = partition("dirichlet", data.train.y, num_clients=10, alpha=0.5, seed=0)
    shards = [data.train.subset(p) for p in parts]

Loaders (one module each; nothing is downloaded): `digits` (scikit-learn's bundled
8x8 digits, the default), `cifar10` and `cifar100` (the python pickles),
`svhn` (the cropped-digit .mat files), `mnist` and `fashion-mnist` (the IDX files),
`synthetic` (seeded Gaussian classes).
"""

from .base import CorruptDatasetError, Dataset, DatasetNotFoundError, Split
from .partition import (
    PARTITIONERS,
    dirichlet,
    format_histograms,
    iid,
    label_histograms,
    mean_top_class_share,
    partition,
    quantity_skew,
)
from .registry import DATASETS, load_dataset

__all__ = [
    "CorruptDatasetError",
    "DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "PARTITIONERS",
    "Split",
    "dirichlet",
    "format_histograms",
    "iid",
    "label_histograms",
    "load_dataset",
    "mean_top_class_share",
    "partition",
    "quantity_skew",
]
