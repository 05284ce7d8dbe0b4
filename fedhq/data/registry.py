"""`load_dataset(name, root=None, **options)`: every dataset by name."""

from __future__ import annotations

from . import cifar10, cifar100, digits, fashion_mnist, mnist, svhn, synthetic
from .base import Dataset, DatasetNotFoundError, call_with_options

# name -> module with `load`; modules with a LAYOUT read files from a root directory,
# those with a DEFAULT_ROOT too when no root is given.
DATASETS = {
    "digits": digits,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "svhn": svhn,
    "mnist": mnist,
    "fashion-mnist": fashion_mnist,
    "synthetic": synthetic,
}


def _folded(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


_BY_FOLDED = {_folded(key): key for key in DATASETS}


def dataset_key(name: str) -> str | None:
    """The registry's name of dataset `name`, ignoring case, '-' and '_' (so
    'Fashion_MNIST', 'fashionmnist' and 'cifar-10' are found), or None if unknown."""
    return _BY_FOLDED.get(_folded(name))


def load_dataset(name: str, root=None, **options) -> Dataset:
    """Load dataset `name`: 'digits' (the default, bundled with scikit-learn),
    'cifar10', 'cifar100', 'svhn', 'mnist', 'fashion-mnist' (read from `root`; see
    each module for its layout; nothing is ever downloaded; the last two default to
    /usr/share/datasets/<name>) or 'synthetic'. 'digits' and 'synthetic' need no
    files and ignore `root`. Options (seed, max_train, test_fraction, ...) go to the
    loader; an unknown one is a ValueError listing the valid ones."""
    key = dataset_key(name)
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    module = DATASETS[key]
    layout = getattr(module, "LAYOUT", None)
    if layout is None:
        return call_with_options(f"dataset {key!r}", module.load, (), options)
    root = root if root is not None else getattr(module, "DEFAULT_ROOT", None)
    if root is None:
        raise DatasetNotFoundError(
            f"dataset {key!r} is read from local files (nothing is downloaded); give its directory as root: {layout}"
        )
    return call_with_options(f"dataset {key!r}", module.load, (root,), options)
