"""`load_dataset(name, root=None, **options)`: every dataset by name."""

from __future__ import annotations

from . import cifar10, cifar100, digits, svhn, synthetic
from .base import Dataset, DatasetNotFoundError, call_with_options

# name -> module with `load`; modules with a LAYOUT read files from a root directory.
DATASETS = {"digits": digits, "cifar10": cifar10, "cifar100": cifar100, "svhn": svhn, "synthetic": synthetic}
_ALIASES = {"cifar-10": "cifar10", "cifar_10": "cifar10", "cifar-100": "cifar100", "cifar_100": "cifar100"}


def load_dataset(name: str, root=None, **options) -> Dataset:
    """Load dataset `name`: 'digits' (the default, bundled with scikit-learn),
    'cifar10', 'cifar100', 'svhn' (read from `root`; see each module for its layout;
    nothing is ever downloaded) or 'synthetic'. 'digits' and 'synthetic' need no
    files and ignore `root`. Options (seed, max_train, test_fraction, ...) go to the
    loader; an unknown one is a ValueError listing the valid ones."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    module = DATASETS[key]
    layout = getattr(module, "LAYOUT", None)
    if layout is None:
        return call_with_options(f"dataset {key!r}", module.load, (), options)
    if root is None:
        raise DatasetNotFoundError(
            f"dataset {key!r} is read from local files (nothing is downloaded); give its directory as root: {layout}"
        )
    return call_with_options(f"dataset {key!r}", module.load, (root,), options)
