"""MNIST and Fashion-MNIST from IDX files: these tests write small IDX files of their
own (plain and gzipped, sound and damaged); nothing is downloaded and the Debian
package is not needed."""

import gzip
import struct
import tracemalloc

import numpy as np
import pytest
import torch

from fedhq.data import CorruptDatasetError, DatasetNotFoundError, fashion_mnist, load_dataset, mnist
from fedhq.data.idx import read_idx
from fedhq.data.registry import dataset_key
from fedhq.fl import RunConfig, engine

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """`array` in the IDX format: two zero bytes, type code, dimension count, big-endian uint32 dims, values."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path, content: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def learnable_split(rng, n: int):
    """28x28 images whose class c is a bright band at rows 2c..2c+4 over noise: a task a
    small CNN learns in a round or two."""
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = rng.integers(0, 80, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(y):
        x[i, 2 * c : 2 * c + 5] = 220
    return x, y.astype(np.uint8)


def write_idx_dataset(folder, rng, n_train=60, n_test=30, gz=False):
    """The four standard files in `folder`; returns {split: (images, labels)} as written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = learnable_split(rng, n)
        images, labels = FILES[split]
        write_file(folder / images, idx_bytes(x), gz)
        write_file(folder / labels, idx_bytes(y), gz)
        written[split] = (x, y)
    return written


def raw_pixels(split, data) -> np.ndarray:
    """Undo the standardization: the uint8 values the loader read."""
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    return ((split.x.double() * std + mean) * 255).round().numpy().astype(np.uint8)


# ---------------------------------------------------------------- sound files


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_reads_plain_and_gzipped_files(tmp_path, gz, name):
    written = write_idx_dataset(tmp_path, np.random.default_rng(1), gz=gz)
    data = load_dataset(name, tmp_path)
    assert data.name == name and data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert (len(data.train), len(data.test)) == (60, 30) and data.source == str(tmp_path)
    for split, (x, y) in (("train", written["train"]), ("test", written["test"])):
        s = getattr(data, split)
        assert np.array_equal(s.y.numpy(), y) and np.array_equal(raw_pixels(s, data)[:, 0], x)
    assert abs(float(data.train.x.mean())) < 1e-5 and abs(float(data.train.x.std()) - 1) < 1e-2
    assert data.class_names[0] == ("T-shirt/top" if name == "fashion-mnist" else "0")


def test_gzip_is_read_by_content_and_the_folder_may_be_a_subfolder(tmp_path):
    folder = tmp_path / "fashion-mnist"
    written = write_idx_dataset(folder, np.random.default_rng(2), gz=True)
    # a gzipped file under the plain name, and a plain one beside the others
    for path in folder.iterdir():
        path.rename(path.with_name(path.name.removesuffix(".gz")))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(written["test"][1]))
    data = load_dataset("fashion-mnist", tmp_path)  # the parent of the fashion-mnist folder
    assert data.source == str(folder) and np.array_equal(data.test.y.numpy(), written["test"][1])


def test_aliases_default_models_and_subsets(tmp_path):
    write_idx_dataset(tmp_path, np.random.default_rng(3), n_train=100)
    for alias in ("Fashion_MNIST", "fashionmnist", " FASHION-MNIST "):
        assert dataset_key(alias) == "fashion-mnist"
        assert RunConfig(dataset=alias).model_spec_text == "small_cnn@28x28x1:10"
    assert dataset_key("cifar-10") == "cifar10" and dataset_key("emnist") is None
    assert RunConfig(dataset="mnist").model_spec_text == "small_cnn@28x28x1:10"
    data = load_dataset("fashion_mnist", tmp_path, max_train=50, max_test=20, seed=4)
    assert (len(data.train), len(data.test)) == (50, 20)
    assert torch.bincount(data.train.y).tolist() == [5] * 10  # stratified


def test_no_root_reads_the_default_directory(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "here", np.random.default_rng(5))
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", str(tmp_path / "here"))
    assert load_dataset("fashion-mnist").source == str(tmp_path / "here")


# ---------------------------------------------------------------- missing files


@pytest.mark.parametrize(
    "module, how",
    [
        (fashion_mnist, r"/usr/share/datasets/fashion-mnist, the default \(apt-get install dataset-fashion-mnist\)"),
        (
            mnist,
            r"no package installs them: get the four files from http://yann\.lecun\.com/exdb/mnist/.*"
            r"/usr/share/datasets/mnist \(the default\)",
        ),
    ],
)
def test_missing_files_say_where_to_get_them(tmp_path, module, how):
    name = "fashion-mnist" if module is fashion_mnist else "mnist"
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'nope'} does not exist.*{how}"):
        load_dataset(name, tmp_path / "nope")
    write_idx_dataset(tmp_path, np.random.default_rng(6))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    missing = r"missing .*t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte\.gz\)"
    with pytest.raises(DatasetNotFoundError, match=missing):
        load_dataset(name, tmp_path)


def test_the_default_directory_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", str(tmp_path / "absent"))
    with pytest.raises(DatasetNotFoundError, match="absent does not exist.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


# ---------------------------------------------------------------- damaged files

GOOD_IMAGES = np.zeros((4, 28, 28), np.uint8)
GOOD_LABELS = np.array([0, 1, 2, 3], np.uint8)


def _header(type_code, dims) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "which, content, msg",
    [
        ("images", b"\x12\x34\x08\x03" + b"\0" * 20, "not an IDX file .magic number 12340803"),
        ("images", b"", "not an IDX file .magic number missing"),
        ("images", idx_bytes(GOOD_IMAGES, type_code=0x0D), "IDX type code 0x0d, expected 0x08"),
        ("labels", idx_bytes(GOOD_LABELS[:, None]), "2-dimensional IDX data, expected 1 dimensions"),
        ("images", _header(0x08, (4, 28, 28))[:10], r"truncated IDX header \(10 of 16 bytes\)"),
        (
            "images",
            idx_bytes(GOOD_IMAGES)[:-100],
            "truncated: header says 4x28x28 = 3136 bytes of data, the file holds 3036",
        ),
        ("images", idx_bytes(np.zeros((4, 27, 28), np.uint8)), "27x28 images, expected 28x28"),
        ("labels", idx_bytes(GOOD_LABELS[:3]), r"3 labels for the 4 images of .*t10k-images-idx3-ubyte"),
        ("labels", idx_bytes(np.array([0, 1, 10, 3], np.uint8)), r"labels must be in \[0, 10\), found \[0, 10\]"),
    ],
)
def test_damaged_files_name_the_file_and_the_fault(tmp_path, gz, which, content, msg):
    write_idx_dataset(tmp_path, np.random.default_rng(7))
    t10k = {"images": "t10k-images-idx3-ubyte", "labels": "t10k-labels-idx1-ubyte"}
    images, labels = write_file(tmp_path / t10k["images"], idx_bytes(GOOD_IMAGES), False), tmp_path / t10k["labels"]
    labels.write_bytes(idx_bytes(GOOD_LABELS))
    target = images if which == "images" else labels
    target.unlink()
    written = write_file(target, content, gz)
    with pytest.raises(CorruptDatasetError, match=f"{written.name}: {msg}"):
        load_dataset("fashion-mnist", tmp_path)


def test_data_after_the_described_values_is_an_error(tmp_path):
    content = idx_bytes(GOOD_LABELS) + b"\x05\x06"
    plain = write_file(tmp_path / "plain", content, False)
    packed = write_file(tmp_path / "packed", content, True)
    with pytest.raises(CorruptDatasetError, match="plain: 2 bytes after the 4 values the header describes"):
        read_idx(plain, 1)
    with pytest.raises(CorruptDatasetError, match="packed.gz: more data after the 4 values the header describes"):
        read_idx(packed, 1)


def test_a_damaged_gzip_stream_names_the_file(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(5000, np.uint8)))[:-12])  # cut before the end marker
    with pytest.raises(CorruptDatasetError, match="labels.gz: not a readable gzip file"):
        read_idx(path, 1)


@pytest.mark.parametrize(
    "gz, msg",
    [
        (False, r"truncated: header says 4294967295x28x28 = 3367254359280 bytes of data, the file holds 8"),
        (
            True,
            r"header claims 4294967295x28x28 = 3367254359280 bytes of data, "
            r"more than a gzipped file of \d+ bytes can hold",
        ),
    ],
)
def test_an_absurd_header_is_refused_before_anything_is_allocated(tmp_path, gz, msg):
    path = write_file(tmp_path / "images", _header(0x08, (2**32 - 1, 28, 28)) + b"\0" * 8, gz)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptDatasetError, match=f"{path.name}: {msg}"):
            read_idx(path, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # a read of the claimed size would ask for 3 TB


# ---------------------------------------------------------------- a federated run


def test_a_federated_run_on_fashion_mnist_files(tmp_path):
    write_idx_dataset(tmp_path / "data", np.random.default_rng(8), n_train=300, n_test=100, gz=True)
    config = RunConfig(
        dataset="fashion-mnist",
        data_root=str(tmp_path / "data"),
        clients=3,
        rounds=2,
        local_epochs=1,
        partition="iid",
        output_dir=str(tmp_path / "run"),
    )
    results = engine.run(config, echo=lambda s: None)
    assert results["dataset"] == "fashion-mnist" and results["model"] == "small_cnn@28x28x1:10"
    assert all(r["rejected"] == [] and r["participants"] == [0, 1, 2] for r in results["rounds"])
    assert results["final_accuracy"] > 0.5  # 10 classes: chance is 0.1
