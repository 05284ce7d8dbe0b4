"""MNIST handwritten digits from their IDX files (no download; the format: fedhq.data.idx).

70000 28x28 grayscale digits in 10 classes, as four IDX files (plain or gzipped). No
Debian package ships them; /usr/share/datasets/mnist, the analogue of Fashion-MNIST's
package directory, is the default, and any directory holding the four files works
(`root`, or `--data-root`).
"""

from __future__ import annotations

from .base import Dataset
from .idx import FILE_LIST, load_idx_dataset

FOLDER = "mnist"
DEFAULT_ROOT = "/usr/share/datasets/mnist"
LAYOUT = (
    f"expected the IDX files {FILE_LIST} (each may end in .gz) in one directory; no package installs "
    f"them: get the four files from http://yann.lecun.com/exdb/mnist/ (or a mirror of it), put them in "
    f"{DEFAULT_ROOT} (the default) or pass their directory as root (--data-root)"
)


def load(root, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """MNIST (60000 train / 10000 test, 1x28x28, 10 classes), standardized with the
    training images' statistics. `max_train`/`max_test` keep a seeded stratified subset."""
    return load_idx_dataset(
        "mnist", root, FOLDER, LAYOUT, [str(d) for d in range(10)], seed=seed, max_train=max_train, max_test=max_test
    )
