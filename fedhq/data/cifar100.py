"""CIFAR-100 (fine labels) from the python version of the distribution (no download).

Expected layout (https://www.cs.toronto.edu/~kriz/cifar.html, cifar-100-python.tar.gz):

    <root>/cifar-100-python/train   training set
    <root>/cifar-100-python/test    test set
    <root>/cifar-100-python/meta    class names (optional)

`root` may also be the cifar-100-python folder itself. Each set is a pickled dict
with b'data' (uint8 [N, 3072], channel-first row-major as CIFAR-10), b'fine_labels'
(N ints in 0..99) and b'coarse_labels' (not used).
"""

from __future__ import annotations

from .base import Dataset, locate, require_files, uint8_files_dataset
from .cifar10 import read_images, read_names

FOLDER = "cifar-100-python"
LAYOUT = (
    f"expected <root>/{FOLDER}/train and test "
    "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"
)


def load(root, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """CIFAR-100 (50000 train / 10000 test, 3x32x32, 100 fine classes), standardized
    with the training set's per-channel statistics. `max_train`/`max_test` keep a
    seeded stratified subset."""
    folder = locate(root, FOLDER, "train", "cifar-100-python.tar.gz", LAYOUT)
    train_path, test_path = require_files(folder, ["train", "test"], LAYOUT)
    x_train, y_train = read_images(train_path, b"fine_labels", 100)
    x_test, y_test = read_images(test_path, b"fine_labels", 100)
    names = read_names(folder / "meta", b"fine_label_names", 100)
    arrays = (x_train, y_train, x_test, y_test)
    return uint8_files_dataset(
        "cifar100",
        folder,
        arrays,
        num_classes=100,
        class_names=names,
        seed=seed,
        max_train=max_train,
        max_test=max_test,
    )
