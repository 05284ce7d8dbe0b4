"""Fashion-MNIST from its IDX files (no download; the format: fedhq.data.idx).

Zalando's 70000 28x28 grayscale images of clothing in 10 classes, as four IDX files
(plain or gzipped). Debian's `dataset-fashion-mnist` package installs them in
/usr/share/datasets/fashion-mnist, the default directory; any directory holding the
four files works (`root`, or `--data-root`).
"""

from __future__ import annotations

from .base import Dataset
from .idx import FILE_LIST, load_idx_dataset

FOLDER = "fashion-mnist"
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
LAYOUT = (
    f"expected the IDX files {FILE_LIST} (each may end in .gz) in one directory; "
    f"Debian's package installs them in {DEFAULT_ROOT}, the default (apt-get install dataset-fashion-mnist), "
    "or get them from https://github.com/zalandoresearch/fashion-mnist and pass their directory as root (--data-root)"
)


def load(root, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """Fashion-MNIST (60000 train / 10000 test, 1x28x28, 10 classes), standardized
    with the training images' statistics. `max_train`/`max_test` keep a seeded
    stratified subset."""
    return load_idx_dataset(
        "fashion-mnist", root, FOLDER, LAYOUT, CLASS_NAMES, seed=seed, max_train=max_train, max_test=max_test
    )
