"""CIFAR-10 from the python version of the distribution (no download).

Expected layout (https://www.cs.toronto.edu/~kriz/cifar.html, cifar-10-python.tar.gz):

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5   training batches
    <root>/cifar-10-batches-py/test_batch                      test batch
    <root>/cifar-10-batches-py/batches.meta                    class names (optional)

`root` may also be the cifar-10-batches-py folder itself. Each batch is a pickled
dict with b'data' (uint8 [N, 3072]: 1024 red, then green, then blue values, each a
row-major 32x32 image) and b'labels' (N ints in 0..9).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import CorruptDatasetError, Dataset, check_labels, locate, read_pickle, require_files, uint8_files_dataset

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
LAYOUT = (
    f"expected <root>/{FOLDER}/data_batch_1 ... data_batch_5 and test_batch "
    "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"
)


def read_images(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle as (uint8 [N, 3, 32, 32], int64 [N]); shared with CIFAR-100."""
    batch = read_pickle(path, "CIFAR python pickle")
    for key in (b"data", label_key):
        if key not in batch:
            found = ", ".join(repr(k) for k in batch) or "nothing"
            raise CorruptDatasetError(f"{path}: no {key!r} entry (found {found})")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CorruptDatasetError(f"{path}: b'data' must be uint8 [N, 3072], found {what}")
    labels = check_labels(batch[label_key], data.shape[0], num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


def read_names(path: Path, key: bytes, num_classes: int) -> list[str] | None:
    """Class names from a meta pickle, or None when the file is absent."""
    if not path.is_file():
        return None
    names = read_pickle(path, "CIFAR meta pickle").get(key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise CorruptDatasetError(f"{path}: expected {key!r} with {num_classes} class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load(root, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """CIFAR-10 (50000 train / 10000 test, 3x32x32, 10 classes), standardized with
    the training set's per-channel statistics. `max_train`/`max_test` keep a seeded
    stratified subset (handy on a CPU)."""
    folder = locate(root, FOLDER, TRAIN_FILES[0], "cifar-10-python.tar.gz", LAYOUT)
    paths = require_files(folder, TRAIN_FILES + [TEST_FILE], LAYOUT)
    parts = [read_images(p, b"labels", 10) for p in paths[:-1]]
    x_train, y_train = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    x_test, y_test = read_images(paths[-1], b"labels", 10)
    names = read_names(folder / "batches.meta", b"label_names", 10)
    arrays = (x_train, y_train, x_test, y_test)
    return uint8_files_dataset(
        "cifar10", folder, arrays, num_classes=10, class_names=names, seed=seed, max_train=max_train, max_test=max_test
    )
