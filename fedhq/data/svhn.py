"""SVHN cropped digits from the standard .mat files (no download).

Expected layout (http://ufldl.stanford.edu/housenumbers/, "Format 2: cropped digits"):

    <root>/train_32x32.mat   training set
    <root>/test_32x32.mat    test set

`root` may also be the parent of an `svhn` folder holding them. Each file is a
MATLAB (v5) file with X (uint8 [32, 32, 3, N]: height, width, RGB, sample) and
y ([N, 1], digits 1..9 as themselves and 10 for the digit 0, which we map to 0).
extra_32x32.mat is not read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from .base import CorruptDatasetError, Dataset, check_labels, locate, require_files, uint8_files_dataset

FOLDER = "svhn"
LAYOUT = (
    "expected <root>/train_32x32.mat and <root>/test_32x32.mat "
    "(format 2, cropped digits, from http://ufldl.stanford.edu/housenumbers/)"
)


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file as (uint8 [N, 3, 32, 32], int64 [N] in 0..9)."""
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types for damaged or HDF5 (v7.3) files
        raise CorruptDatasetError(f"{path}: not a readable MATLAB v5 file ({type(e).__name__}: {e})") from e
    for key in ("X", "y"):
        if key not in mat:
            found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
            raise CorruptDatasetError(f"{path}: no variable {key!r} (found {found})")
    x = mat["X"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise CorruptDatasetError(f"{path}: X must be uint8 [32, 32, 3, N], found {x.dtype} {x.shape}")
    y = check_labels(mat["y"], x.shape[3], 11, path)
    if y.size and y.min() < 1:
        raise CorruptDatasetError(f"{path}: labels must be 1..10 (10 is the digit 0), found {y.min()}")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def load(root, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """SVHN (73257 train / 26032 test, 3x32x32, 10 classes), standardized with the
    training set's per-channel statistics. `max_train`/`max_test` keep a seeded
    stratified subset."""
    folder = locate(root, FOLDER, "train_32x32.mat", None, LAYOUT)
    train_path, test_path = require_files(folder, ["train_32x32.mat", "test_32x32.mat"], LAYOUT)
    x_train, y_train = read_mat(train_path)
    x_test, y_test = read_mat(test_path)
    arrays = (x_train, y_train, x_test, y_test)
    return uint8_files_dataset(
        "svhn", folder, arrays, num_classes=10, class_names=None, seed=seed, max_train=max_train, max_test=max_test
    )
