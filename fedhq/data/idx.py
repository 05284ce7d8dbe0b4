"""The IDX file format of MNIST and Fashion-MNIST, read strictly (no download).

An IDX file is two zero bytes, a type code (0x08: unsigned bytes, the only one these
datasets use), the number of dimensions, each dimension as a big-endian uint32, then
the values in row-major order. A dataset directory holds four of them, each plain or
gzipped (the name may end in .gz; the content decides):

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

Every header is checked against the file's length before anything is allocated, so a
damaged or forged header is a CorruptDatasetError naming the file, never a huge read.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .base import (
    CorruptDatasetError,
    Dataset,
    DatasetNotFoundError,
    check_labels,
    locate,
    require_directory,
    uint8_files_dataset,
)

UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
# Deflate's best case is 1032:1 (a long run of one byte), so a gzipped file of S bytes
# decompresses to at most 1032 * S: a header claiming more is rejected unread.
DEFLATE_MAX_RATIO = 1032
CHUNK_BYTES = 1 << 20
IMAGE_SIZE = 28
NUM_CLASSES = 10
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_LIST = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The unsigned-byte IDX file at `path` (gzipped or not) as a uint8 array of `ndim`
    dimensions, or CorruptDatasetError naming the file and what is wrong with it."""
    path = Path(path)
    file_bytes = path.stat().st_size
    with open(path, "rb") as f:
        gzipped = f.read(2) == GZIP_MAGIC
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            dims = _read_header(f, path, ndim)
            header_bytes = 4 + 4 * ndim
            claimed = math.prod(dims)
            shape = "x".join(map(str, dims))
            if gzipped:
                if claimed > DEFLATE_MAX_RATIO * file_bytes:
                    raise CorruptDatasetError(
                        f"{path}: header claims {shape} = {claimed} bytes of data, more than a gzipped file of "
                        f"{file_bytes} bytes can hold (damaged or not an IDX file)"
                    )
                data = _read_at_most(f, claimed)
                if len(data) == claimed and f.read(1):
                    raise CorruptDatasetError(f"{path}: more data after the {shape} values the header describes")
            else:
                if claimed != file_bytes - header_bytes:
                    raise CorruptDatasetError(_length_mismatch(path, shape, claimed, file_bytes - header_bytes))
                data = bytearray(claimed)
                del data[f.readinto(data) :]  # in place: a file that shrank since stat() reads short
    except (OSError, EOFError, zlib.error) as e:  # mostly a damaged gzip stream
        what = "a readable gzip file" if gzipped else "readable"
        raise CorruptDatasetError(f"{path}: not {what} ({type(e).__name__}: {e})") from e
    if len(data) != claimed:
        raise CorruptDatasetError(_length_mismatch(path, shape, claimed, len(data)))
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)  # a bytearray: writable, as torch wants


def _read_header(f, path: Path, ndim: int) -> tuple[int, ...]:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0":
        raise CorruptDatasetError(
            f"{path}: not an IDX file (magic number {magic.hex() or 'missing'}, "
            "expected two zero bytes, a type code and a dimension count)"
        )
    if magic[2] != UBYTE:
        raise CorruptDatasetError(f"{path}: IDX type code 0x{magic[2]:02x}, expected 0x08 (unsigned bytes)")
    if magic[3] != ndim:
        raise CorruptDatasetError(f"{path}: {magic[3]}-dimensional IDX data, expected {ndim} dimensions")
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise CorruptDatasetError(f"{path}: truncated IDX header ({4 + len(raw)} of {4 + 4 * ndim} bytes)")
    return struct.unpack(f">{ndim}I", raw)


def _read_at_most(f, limit: int) -> bytearray:
    """Up to `limit` bytes, read in chunks, so memory follows the data actually there."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = f.read(min(CHUNK_BYTES, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _length_mismatch(path: Path, shape: str, claimed: int, found: int) -> str:
    if found < claimed:
        return f"{path}: truncated: header says {shape} = {claimed} bytes of data, the file holds {found}"
    return f"{path}: {found - claimed} bytes after the {shape} values the header describes"


def find_file(folder: Path, name: str, layout: str) -> Path:
    """folder/name, else folder/name.gz, else DatasetNotFoundError naming both and `layout`."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(f"missing {folder / name} (or {name}.gz); {layout}")


def read_split(folder: Path, split: str, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's (uint8 [N, 1, 28, 28], int64 [N] in 0..9), checked against each other."""
    images_path, labels_path = (find_file(folder, name, layout) for name in SPLITS[split])
    images = read_idx(images_path, 3)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise CorruptDatasetError(
            f"{images_path}: {images.shape[1]}x{images.shape[2]} images, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    labels = read_idx(labels_path, 1)
    if labels.shape[0] != images.shape[0]:
        raise CorruptDatasetError(
            f"{labels_path}: {labels.shape[0]} labels for the {images.shape[0]} images of {images_path}"
        )
    return images[:, None], check_labels(labels, images.shape[0], NUM_CLASSES, labels_path)


def load_idx_dataset(
    name: str,
    root,
    folder_name: str,
    layout: str,
    class_names,
    *,
    seed: int,
    max_train: int | None,
    max_test: int | None,
) -> Dataset:
    """A 28x28 grayscale, 10-class IDX dataset from `root` (or its `folder_name`
    subfolder), standardized with the training images' statistics."""
    folder = require_directory(locate(root, folder_name, SPLITS["train"][0], None, layout), layout)
    x_train, y_train = read_split(folder, "train", layout)
    x_test, y_test = read_split(folder, "test", layout)
    arrays = (x_train, y_train, x_test, y_test)
    return uint8_files_dataset(
        name,
        folder,
        arrays,
        num_classes=NUM_CLASSES,
        class_names=class_names,
        seed=seed,
        max_train=max_train,
        max_test=max_test,
    )
