"""The dataset type every loader returns, the errors loaders raise, and the small
helpers they share (train/test splitting, standardization, safe pickle reading)."""

from __future__ import annotations

import importlib
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedhq_kernels.checks import is_int


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's directory or one of its files is missing; the message names the
    expected layout and where to get the files."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but is not in the expected format; the message names the file."""


@dataclass(frozen=True, repr=False)
class Split:
    """One side of a dataset: `x` float32 [N, C, H, W] (standardized), `y` int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.x.dtype != torch.float32 or self.x.dim() != 4:
            raise ValueError(f"x must be float32 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"y must be int64 [{self.x.shape[0]}], got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices) -> Split:
        """The samples at `indices` (e.g. one client's shard from a partitioner)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Split(self.x[idx], self.y[idx])

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, x={tuple(self.x.shape)})"


@dataclass(frozen=True, repr=False)
class Dataset:
    """A classification dataset: standardized images with a fixed train/test split.

    `mean`/`std` are the per-channel statistics of the training images (after scaling
    to [0, 1] for image files) that both splits were standardized with; `source` says
    where the data came from.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.x.shape[1:])

    def summary(self) -> str:
        c, h, w = self.input_shape
        return (
            f"{self.name}: {len(self.train)} train / {len(self.test)} test images, "
            f"{c}x{h}x{w}, {self.num_classes} classes ({self.source})"
        )

    def __repr__(self) -> str:
        return f"Dataset({self.summary()})"


# ---------------------------------------------------------------- building a Dataset


def stratified_test_indices(labels: np.ndarray, test_size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `test_size` samples drawn so each class keeps its share
    (largest-remainder rounding of the per-class quotas)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * test_size / labels.size
    take = np.floor(quota).astype(np.int64)
    short = test_size - int(take.sum())
    # Largest fractional parts first; a stable sort breaks ties by class order.
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train_idx, test_idx), both sorted; the test side gets
    ceil(test_fraction * N) samples, as scikit-learn's train_test_split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n = len(labels)
    test = stratified_test_indices(labels, math.ceil(test_fraction * n), np.random.default_rng(seed))
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def subsample(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int, what: str):
    """At most `limit` samples of (x, y), stratified and seeded; all of them when
    `limit` is None or not smaller than N."""
    if limit is None:
        return x, y
    if not is_int(limit) or limit < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {limit!r}")
    if limit >= len(y):
        return x, y
    keep = stratified_test_indices(y, int(limit), np.random.default_rng(seed))
    return x[keep], y[keep]


def uint8_files_dataset(
    name: str, folder: Path, arrays, *, num_classes: int, class_names, seed: int, max_train, max_test
) -> Dataset:
    """The file loaders' common tail: (x_train, y_train, x_test, y_test) of uint8 images,
    `subsample`d (training set with `seed`, test set with `seed + 1`: the loaders' one
    convention for `max_train` / `max_test`), then standardized into a Dataset."""
    x_train, y_train, x_test, y_test = arrays
    x_train, y_train = subsample(x_train, y_train, max_train, seed, "max_train")
    x_test, y_test = subsample(x_test, y_test, max_test, seed + 1, "max_test")
    return build_dataset(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=num_classes,
        class_names=class_names,
        source=str(folder),
        max_value=255.0,
    )


def _channel_stats(x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of [N, C, H, W] data, in float64."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        # Exact and copy-free enough for 50k CIFAR images: a 256-bin histogram per channel.
        values = np.arange(256, dtype=np.float64)
        mean, std = [], []
        for c in range(x.shape[1]):
            counts = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
            m = counts @ values / counts.sum()
            mean.append(m)
            std.append(math.sqrt(counts @ (values - m) ** 2 / counts.sum()))
        return np.array(mean), np.array(std)
    t = torch.as_tensor(x).to(torch.float64)
    var, mean = torch.var_mean(t, dim=(0, 2, 3), correction=0)
    return mean.numpy(), var.sqrt().numpy()


def build_dataset(
    name: str,
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray,
    x_test: np.ndarray | torch.Tensor,
    y_test: np.ndarray,
    *,
    num_classes: int,
    class_names: Sequence[str] | None,
    source: str,
    max_value: float = 1.0,
) -> Dataset:
    """Standardize [N, C, H, W] images with the training set's per-channel statistics
    (after dividing by `max_value`, e.g. 255 for uint8 images) and wrap them.

    A constant channel (std 0) is only centered, never divided by zero.
    """
    mean, std = _channel_stats(x_train)
    std = np.where(std > 0, std, max_value)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_split(x, y) -> Split:
        # (x - mean) / std in the stored units equals standardizing x / max_value.
        xt = torch.as_tensor(x).to(torch.float32).sub_(m).div_(s)
        return Split(xt.contiguous(), torch.as_tensor(np.asarray(y, dtype=np.int64)))

    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    return Dataset(
        name=name,
        train=to_split(x_train, y_train),
        test=to_split(x_test, y_test),
        num_classes=num_classes,
        class_names=names,
        mean=tuple(float(v) for v in mean / max_value),
        std=tuple(float(v) for v in std / max_value),
        source=source,
    )


# ---------------------------------------------------------------- reading files


def require_directory(root: Path, layout: str) -> Path:
    """`root`, or DatasetNotFoundError when it is not a directory, naming `layout`."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset directory {root} does not exist or is not a directory; {layout}")
    return root


def require_files(root: Path, names: Sequence[str], layout: str) -> list[Path]:
    """The paths root/name, or DatasetNotFoundError naming the first missing one and `layout`."""
    require_directory(root, layout)
    paths = [root / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetNotFoundError(f"missing {missing[0]}{more}; {layout}")
    return paths


def _numpy_internal(module: str, name: str):
    """numpy.core.<module>.<name> from pickles written by numpy 1 or 2, without the
    deprecated numpy.core shim."""
    try:
        mod = importlib.import_module(f"numpy._core.{module}")
    except ImportError:  # numpy < 2
        mod = importlib.import_module(f"numpy.core.{module}")
    return getattr(mod, name)


_PICKLE_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,  # bytes in protocol-2 pickles
}
for _core in ("numpy.core", "numpy._core"):
    _PICKLE_ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = lambda: _numpy_internal("multiarray", "_reconstruct")
    _PICKLE_ALLOWED[(f"{_core}.multiarray", "scalar")] = lambda: _numpy_internal("multiarray", "scalar")
    _PICKLE_ALLOWED[(f"{_core}.numeric", "_frombuffer")] = lambda: _numpy_internal("numeric", "_frombuffer")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a dataset file cannot run code."""

    def find_class(self, module, name):
        make = _PICKLE_ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a data file holds only arrays and lists")
        return make()


def read_pickle(path: Path, kind: str) -> dict:
    """A pickled dict (Python 2 strings read as bytes, as the CIFAR files need), or
    CorruptDatasetError naming `path`."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a damaged or foreign file
        raise CorruptDatasetError(f"{path}: not a readable {kind} ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CorruptDatasetError(f"{path}: not a {kind}: expected a dict, found {type(obj).__name__}")
    return obj


def check_labels(labels, n: int, num_classes: int, path: Path) -> np.ndarray:
    """Labels as int64 [n] in [0, num_classes), or CorruptDatasetError naming `path`."""
    try:
        y = np.asarray(labels)
    except Exception as e:
        raise CorruptDatasetError(f"{path}: labels are not an array ({e})") from e
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise CorruptDatasetError(f"{path}: expected {n} integer labels, found {y.dtype} {y.shape}")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise CorruptDatasetError(f"{path}: labels are not whole numbers")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise CorruptDatasetError(f"{path}: labels must be in [0, {num_classes}), found [{y.min()}, {y.max()}]")
    return y


def locate(root, folder: str, marker: str, archive: str | None, layout: str) -> Path:
    """The directory holding a dataset's files: `root/folder` when it exists, else
    `root` itself (so either the extracted folder or its parent works). A root that
    is, or holds, the unextracted `archive` gets an error saying to extract it."""
    if root is None:
        raise DatasetNotFoundError(f"this dataset is read from local files; pass its directory as root. {layout}")
    root = Path(root).expanduser()
    if archive and root.is_file() and root.name == archive:
        raise DatasetNotFoundError(
            f"{root} is the archive; extract it first (tar xzf {root}) and pass the directory. {layout}"
        )
    if (root / folder).is_dir():
        return root / folder
    if archive and not (root / marker).exists() and (root / archive).is_file():
        raise DatasetNotFoundError(
            f"found {root / archive} but not its contents; extract it first "
            f"(tar xzf {root / archive} -C {root}). {layout}"
        )
    return root


def call_with_options(what: str, func, args: tuple, options: dict):
    """func(*args, **options), with unknown or missing options reported as ValueError
    listing the options `func` takes (instead of a bare TypeError)."""
    import inspect

    sig = inspect.signature(func)
    valid = [p.name for p in list(sig.parameters.values())[len(args) :]]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{what} got unknown option(s) {', '.join(unknown)}; it takes: {', '.join(valid) or 'none'}")
    try:
        sig.bind(*args, **options)
    except TypeError as e:
        raise ValueError(f"{what}: {e}; it takes: {', '.join(valid)}") from None
    return func(*args, **options)
