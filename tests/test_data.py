"""Datasets and partitioners. The CIFAR and SVHN loaders read small files that these
tests write in the exact distribution formats; nothing is downloaded."""

import functools
import logging
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from fedhq.data import (
    CorruptDatasetError,
    DatasetNotFoundError,
    Split,
    dirichlet,
    format_histograms,
    iid,
    label_histograms,
    load_dataset,
    mean_top_class_share,
    partition,
    quantity_skew,
)

# ---------------------------------------------------------------- writers of the standard formats


def py2_pickle(obj) -> bytes:
    """Pickle `obj` as Python 2's cPickle (protocol 2) wrote the CIFAR files: str as
    SHORT_BINSTRING/BINSTRING, numpy arrays through numpy.core.multiarray._reconstruct.
    Handles dict, list, int, bytes and numpy arrays."""
    out = [b"\x80\x02"]

    def string(s: bytes):
        out.append(b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<i", len(s)) + s)

    def dump(o):
        if isinstance(o, dict):
            out.append(b"}(")
            for k, v in o.items():
                dump(k)
                dump(v)
            out.append(b"u")
        elif isinstance(o, list):
            out.append(b"](")
            for v in o:
                dump(v)
            out.append(b"e")
        elif isinstance(o, (int, np.integer)):
            out.append(b"J" + struct.pack("<i", int(o)))
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, np.ndarray):
            # _reconstruct(ndarray, (0,), 'b') then __setstate__((1, shape, dtype, False, raw))
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            string(b"b")
            out.append(b"\x87R(K\x01(")
            for d in o.shape:
                out.append(b"J" + struct.pack("<i", d))
            out.append(b"tcnumpy\ndtype\n")
            string(o.dtype.str[1:].encode())  # 'u1', 'i8', ...
            out.append(b"K\x00K\x01\x87R(K\x03")
            string(o.dtype.str[:1].encode())  # byte order
            out.append(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(np.ascontiguousarray(o).tobytes())
            out.append(b"tb")
        else:
            raise TypeError(type(o))

    dump(obj)
    return b"".join(out) + b"."


def random_images(rng, n):
    """uint8 [n, 3072] rows as CIFAR stores them: 1024 red, 1024 green, 1024 blue, row-major."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root, rng, sizes=(5, 4, 6, 3, 4), n_test=7, meta=True):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i, n in enumerate(sizes, start=1):
        x, y = random_images(rng, n), [int(v) for v in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": b"training batch %d of 5" % i,
            b"labels": y,
            b"data": x,
            b"filenames": [b"img_%d.png" % j for j in range(n)],
        }
        (folder / f"data_batch_{i}").write_bytes(py2_pickle(batch))
        xs.append(x)
        ys += y
    xt, yt = random_images(rng, n_test), [int(v) for v in rng.integers(0, 10, n_test)]
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt}
    (folder / "test_batch").write_bytes(py2_pickle(test))
    if meta:
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        meta = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
        (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return folder, (np.concatenate(xs), np.array(ys)), (xt, np.array(yt))


def write_cifar100(root, rng, n_train=12, n_test=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    sets = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x, fine = random_images(rng, n), [int(v) for v in rng.integers(0, 100, n)]
        fine[0] = 99
        coarse = [f // 5 for f in fine]
        entries = {
            b"filenames": [b"f%d.png" % j for j in range(n)],
            b"batch_label": name.encode(),
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": x,
        }
        (folder / name).write_bytes(py2_pickle(entries))
        sets[name] = (x, np.array(fine))
    (folder / "meta").write_bytes(
        py2_pickle(
            {
                b"fine_label_names": [b"class%d" % i for i in range(100)],
                b"coarse_label_names": [b"super%d" % i for i in range(20)],
            }
        )
    )
    return folder, sets["train"], sets["test"]


def write_svhn(root, rng, n_train=9, n_test=4):
    sets = {}
    for name, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # height, width, RGB, sample
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        y[0, 0] = 10  # the digit 0 is stored as 10
        scipy.io.savemat(str(root / f"{name}_32x32.mat"), {"X": X, "y": y})
        sets[name] = (X, y)
    return sets["train"], sets["test"]


def raw_pixels(split, data) -> np.ndarray:
    """Undo the standardization: the uint8 values the loader read."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return ((split.x.double() * std + mean) * 255).round().numpy().astype(np.uint8)


# ---------------------------------------------------------------- digits and synthetic


def test_digits_shapes_split_and_standardization():
    d = load_dataset("digits")
    assert d.name == "digits" and d.num_classes == 10 and d.input_shape == (1, 8, 8)
    assert len(d.train) == 1437 and len(d.test) == 360  # 20% test, rounded up as scikit-learn
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    # stratified: each class keeps its share of the test set (to one sample)
    total = np.bincount(np.concatenate([d.train.y.numpy(), d.test.y.numpy()]), minlength=10)
    assert np.all(np.abs(np.bincount(d.test.y.numpy(), minlength=10) - total * 0.2) <= 1)
    assert abs(d.train.x.mean().item()) < 1e-5 and abs(d.train.x.std().item() - 1) < 1e-3
    assert 0 < d.mean[0] < 1 and d.std[0] > 0  # statistics of images scaled to [0, 1]

    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.test.x, d.test.x)
    assert len(load_dataset("digits", test_fraction=0.5).test) == 899
    small = load_dataset("digits", max_train=200)
    assert len(small.train) == 200 and torch.equal(small.test.y, d.test.y)  # the test side is kept whole
    assert np.all(np.abs(np.bincount(small.train.y.numpy(), minlength=10) - 20) <= 1)  # stratified


def test_synthetic_is_seeded_shaped_and_learnable():
    d = load_dataset("synthetic", seed=3, num_classes=4, num_train=400, num_test=200, channels=2, image_size=8)
    assert d.input_shape == (2, 8, 8) and d.num_classes == 4 and (len(d.train), len(d.test)) == (400, 200)
    assert np.bincount(d.train.y.numpy()).tolist() == [100] * 4
    same = load_dataset("synthetic", seed=3, num_classes=4, num_train=400, num_test=200, channels=2, image_size=8)
    assert torch.equal(same.train.x, d.train.x) and torch.equal(same.test.y, d.test.y)
    assert not torch.equal(
        load_dataset("synthetic", seed=4, num_train=400, num_test=200, channels=2, image_size=8, num_classes=4).train.x,
        d.train.x,
    )
    # A nearest-class-mean classifier does far better than chance (0.25).
    means = torch.stack([d.train.x[d.train.y == c].mean(0) for c in range(4)])
    pred = ((d.test.x[:, None] - means[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert (pred == d.test.y).float().mean() > 0.6


@pytest.mark.parametrize(
    "opts, msg",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(num_train=0), "num_train"),
        (dict(image_size=2.5), "image_size"),
        (dict(class_sep=float("nan")), "class_sep"),
    ],
)
def test_synthetic_rejects_bad_options(opts, msg):
    with pytest.raises(ValueError, match=msg):
        load_dataset("synthetic", **opts)


def test_unknown_dataset_and_options():
    valid = "digits, cifar10, cifar100, svhn, mnist, fashion-mnist, synthetic"
    with pytest.raises(ValueError, match=f"unknown dataset 'emnist'; choose one of: {valid}"):
        load_dataset("emnist")
    with pytest.raises(ValueError, match="unknown option.*colour.*it takes: seed, test_fraction, max_train"):
        load_dataset("digits", colour=True)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_dataset("digits", test_fraction=1.0)


def test_split_checks_and_subset():
    d = load_dataset("synthetic", num_train=20, num_test=5, image_size=4, channels=1)
    sub = d.train.subset(np.array([3, 0, 7]))
    assert len(sub) == 3 and torch.equal(sub.y, d.train.y[[3, 0, 7]])
    with pytest.raises(ValueError, match="float32"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.int64))
    assert "20 train / 5 test" in repr(d)


# ---------------------------------------------------------------- CIFAR and SVHN files


def test_cifar10_reads_the_python_pickles(tmp_path):
    rng = np.random.default_rng(0)
    folder, (x, y), (xt, yt) = write_cifar10(tmp_path, rng)
    d = load_dataset("cifar10", tmp_path)  # the parent of cifar-10-batches-py
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10 and d.class_names[0] == "airplane"
    assert len(d.train) == 22 and len(d.test) == 7
    assert d.train.y.tolist() == y.tolist() and d.test.y.tolist() == yt.tolist()
    # Channel-first, row-major: value k of a row is channel k // 1024, row (k % 1024) // 32, column k % 32.
    assert np.array_equal(raw_pixels(d.train, d), x.reshape(-1, 3, 32, 32))
    assert np.array_equal(raw_pixels(d.test, d), xt.reshape(-1, 3, 32, 32))
    assert abs(d.mean[0] - x.reshape(-1, 3, 1024)[:, 0].mean() / 255) < 1e-9
    # the extracted folder itself works too
    assert torch.equal(load_dataset("cifar-10", folder).train.x, d.train.x)


def test_cifar10_meta_is_optional_and_subsets_are_stratified(tmp_path):
    rng = np.random.default_rng(1)
    write_cifar10(tmp_path, rng, sizes=(40, 40, 40, 40, 40), n_test=20, meta=False)
    d = load_dataset("cifar10", tmp_path, max_train=50, max_test=10, seed=5)
    assert d.class_names == tuple(str(i) for i in range(10))
    assert (len(d.train), len(d.test)) == (50, 10)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_train must be a positive integer"):
            load_dataset("cifar10", tmp_path, max_train=bad)


def test_cifar10_reads_pickles_written_by_python3(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x = random_images(rng, 3)
    for i, protocol in enumerate((2, 4, 5, 2, 4), start=1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": x, b"labels": [1, 2, 3]}, protocol=protocol))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": np.array([4, 5, 6])}, protocol=5))
    d = load_dataset("cifar10", folder)
    assert len(d.train) == 15 and d.test.y.tolist() == [4, 5, 6]
    assert np.array_equal(raw_pixels(d.test, d), x.reshape(-1, 3, 32, 32))


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(3)
    folder, (x, fine), (xt, fine_t) = write_cifar100(tmp_path, rng)
    for root in (tmp_path, folder):
        d = load_dataset("cifar100", root)
        assert d.num_classes == 100 and d.class_names[99] == "class99"
        assert d.train.y.tolist() == fine.tolist() and d.test.y.tolist() == fine_t.tolist()
        assert np.array_equal(raw_pixels(d.train, d), x.reshape(-1, 3, 32, 32))


def test_svhn_reads_the_mat_files_and_maps_10_to_0(tmp_path):
    rng = np.random.default_rng(4)
    (X, y), (Xt, yt) = write_svhn(tmp_path, rng)
    d = load_dataset("svhn", tmp_path)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert d.train.y.tolist() == [0 if v == 10 else int(v) for v in y[:, 0]]
    assert d.test.y[0].item() == 0 and d.train.y.max() <= 9
    # X[h, w, c, i] is image i, channel c, row h, column w
    assert np.array_equal(raw_pixels(d.train, d), X.transpose(3, 2, 0, 1))
    assert np.array_equal(raw_pixels(d.test, d), Xt.transpose(3, 2, 0, 1))
    sub = tmp_path / "parent"
    (sub / "svhn").mkdir(parents=True)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (sub / "svhn" / name).write_bytes((tmp_path / name).read_bytes())
    assert torch.equal(load_dataset("svhn", sub).train.x, d.train.x)


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "cifar10",
            r"expected <root>/cifar-10-batches-py/data_batch_1 \.\.\. .*https://www\.cs\.toronto\.edu/~kriz/cifar\.html",
        ),
        (
            "cifar100",
            r"expected <root>/cifar-100-python/train and test .*https://www\.cs\.toronto\.edu/~kriz/cifar\.html",
        ),
        ("svhn", r"expected <root>/train_32x32\.mat and <root>/test_32x32\.mat"),
    ],
)
def test_missing_directory_or_files_name_the_layout(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError, match=f"{name}.*read from local files.*{expected}"):
        load_dataset(name)
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'nope'} does not exist.*{expected}"):
        load_dataset(name, tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match=f"missing .*{expected}"):
        load_dataset(name, tmp_path)  # an empty directory
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def test_missing_single_file_and_unextracted_archive(tmp_path):
    folder, _, _ = write_cifar10(tmp_path, np.random.default_rng(5))
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing .*test_batch;"):
        load_dataset("cifar10", tmp_path)
    other = tmp_path / "dl"
    other.mkdir()
    (other / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetNotFoundError, match="extract it first"):
        load_dataset("cifar10", other)
    with pytest.raises(DatasetNotFoundError, match="is the archive; extract it first"):
        load_dataset("cifar10", other / "cifar-10-python.tar.gz")


@pytest.mark.parametrize(
    "content, msg",
    [
        (b"not a pickle at all", "not a readable CIFAR python pickle"),
        (b"", "not a readable CIFAR python pickle"),
        (py2_pickle([1, 2]), "expected a dict, found list"),
        (py2_pickle({b"labels": [1]}), "no b'data' entry"),
        (py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}), r"b'data' must be uint8 \[N, 3072\]"),
        (py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}), "expected 2 integer labels"),
        (py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}), r"labels must be in \[0, 10\)"),
        # a pickle that would run a command: refused, never executed
        (b"\x80\x02cos\nsystem\nU\x04true\x85R.", "refusing to load os.system"),
    ],
)
def test_corrupt_cifar_files_name_the_file(tmp_path, content, msg):
    folder, _, _ = write_cifar10(tmp_path, np.random.default_rng(6))
    (folder / "data_batch_3").write_bytes(content)
    with pytest.raises(CorruptDatasetError, match=f"data_batch_3: .*{msg}"):
        load_dataset("cifar10", tmp_path)


def test_corrupt_cifar100_and_svhn_files_name_the_file(tmp_path):
    folder, _, _ = write_cifar100(tmp_path, np.random.default_rng(7))
    (folder / "test").write_bytes(py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}))
    with pytest.raises(CorruptDatasetError, match=r"test: no b'fine_labels' entry"):
        load_dataset("cifar100", tmp_path)

    svhn = tmp_path / "svhn"
    svhn.mkdir()
    write_svhn(svhn, np.random.default_rng(8))
    (svhn / "test_32x32.mat").write_bytes(b"garbage" * 40)
    with pytest.raises(CorruptDatasetError, match="test_32x32.mat: not a readable MATLAB"):
        load_dataset("svhn", svhn)
    for mat, msg in (
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [1]])}, "labels must be 1..10"),
        ({"X": np.zeros((32, 32, 1, 2), np.uint8), "y": np.array([[1], [1]])}, r"X must be uint8 \[32, 32, 3, N\]"),
        ({"images": np.zeros(3)}, "no variable 'X'"),
    ):
        scipy.io.savemat(str(svhn / "test_32x32.mat"), mat)
        with pytest.raises(CorruptDatasetError, match=f"test_32x32.mat: .*{msg}"):
            load_dataset("svhn", svhn)


# ---------------------------------------------------------------- partitioners


@functools.lru_cache(maxsize=1)
def digits_labels():
    return load_dataset("digits").train.y


def assert_partition(parts, n, num_clients):
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))  # covers all, no overlap


@pytest.mark.parametrize(
    "method, opts",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.1}),
        ("dirichlet", {"alpha": 0.5}),
        ("dirichlet", {"alpha": 100.0}),
        ("quantity", {"alpha": 0.5}),
        ("quantity", {"sigma": 1.0}),
    ],
)
@pytest.mark.parametrize("num_clients", [1, 10, 37])
def test_partitions_cover_without_overlap_and_are_deterministic(method, opts, num_clients):
    y = digits_labels()
    parts = partition(method, y, num_clients, seed=7, **opts)
    assert_partition(parts, len(y), num_clients)
    again = partition(method, y.numpy(), num_clients, seed=7, **opts)  # torch or numpy labels alike
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if num_clients > 1:
        other = partition(method, y, num_clients, seed=8, **opts)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_are_equal_to_one():
    sizes = [len(p) for p in iid(np.arange(103) % 5, 10, seed=0)]
    assert max(sizes) - min(sizes) == 1 and sum(sizes) == 103


def test_dirichlet_lower_alpha_concentrates_labels():
    y = digits_labels()

    def top_share(alpha):
        hists = [label_histograms(y, dirichlet(y, 10, alpha, seed=s), 10) for s in range(5)]
        return np.mean([mean_top_class_share(h) for h in hists])

    shares = [top_share(a) for a in (0.05, 0.5, 5.0, 1000.0)]
    assert shares[0] > shares[1] > shares[2] > shares[3]
    assert shares[0] > 0.6 and shares[3] < 0.15  # ~one class per client vs ~balanced (1/10)
    iid_share = mean_top_class_share(label_histograms(y, iid(y, 10, seed=0), 10))
    assert iid_share < 0.15


def test_dirichlet_respects_min_size_even_when_it_must_rebalance(caplog):
    y = digits_labels()
    for seed in range(3):
        assert min(len(p) for p in dirichlet(y, 20, 0.1, seed=seed, min_size=30)) >= 30
    # one try at a tiny alpha over 60 clients cannot give everyone 20 samples: moved, with a warning
    with caplog.at_level(logging.WARNING, logger="fedhq.data.partition"):
        parts = dirichlet(y, 60, 0.01, seed=0, min_size=20, max_tries=1)
    assert_partition(parts, len(y), 60)
    assert min(len(p) for p in parts) >= 20
    assert "moved" in caplog.text
    assert mean_top_class_share(label_histograms(y, parts, 10)) > 0.5  # still skewed


def test_quantity_skew_gives_unequal_sizes_with_iid_labels():
    y = digits_labels()
    for opts in ({"alpha": 0.5}, {"sigma": 1.5}):
        sizes = np.array([len(p) for p in quantity_skew(y, 10, seed=1, **opts)])
        assert sizes.min() >= 10 and sizes.max() > 3 * sizes.min()
    big = quantity_skew(y, 10, alpha=0.5, seed=1, min_size=50)
    assert min(len(p) for p in big) >= 50
    largest = max(big, key=len)
    assert mean_top_class_share(label_histograms(y, [largest], 10)) < 0.2  # labels stay mixed
    assert [len(p) for p in quantity_skew(y, 10, seed=1)] == [len(p) for p in quantity_skew(y, 10, alpha=0.5, seed=1)]


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda: iid(np.arange(7), 10), "10 clients but only 7 samples"),
        (lambda: dirichlet(np.arange(7) % 2, 10, 0.5), "10 clients but only 7 samples"),
        (lambda: quantity_skew(np.arange(7), 10), "10 clients but only 7 samples"),
        (lambda: iid(np.arange(7), 0), "num_clients must be a positive integer, got 0"),
        (lambda: iid(np.arange(7), 2.5), "num_clients must be a positive integer, got 2.5"),
        (lambda: iid(np.arange(7), True), "num_clients must be a positive integer"),
        (lambda: dirichlet(np.arange(50) % 5, 5, 0.0), "alpha must be a positive finite number, got 0.0"),
        (lambda: dirichlet(np.arange(50) % 5, 5, -1), "alpha must be a positive"),
        (lambda: dirichlet(np.arange(50) % 5, 5, float("inf")), "alpha must be a positive"),
        (
            lambda: dirichlet(np.arange(50) % 5, 5, 0.5, min_size=11),
            "5 clients with at least min_size=11 .* need 55 samples, but there are only 50",
        ),
        (lambda: dirichlet(np.arange(50) % 5, 5, 0.5, max_tries=0), "max_tries must be a positive integer"),
        (lambda: quantity_skew(np.arange(50), 5, alpha=0.5, sigma=1.0), "either alpha .* or sigma"),
        (lambda: quantity_skew(np.arange(50), 5, sigma=0), "sigma must be a positive"),
        (lambda: iid(np.zeros((4, 2), np.int64), 2), "labels must be 1-D"),
        (lambda: iid(np.array([0.5, 1.0]), 2), "labels must be integers"),
        (lambda: iid(np.array([], np.int64), 1), "labels are empty"),
        (lambda: iid(np.array([0, -1]), 1), "non-negative"),
        (lambda: iid(np.arange(7), 2, seed=1.5), "seed must be an integer"),
        (
            lambda: partition("pathological", np.arange(7), 2),
            "unknown partition 'pathological'; choose one of: iid, dirichlet, quantity",
        ),
        (lambda: partition("dirichlet", np.arange(7), 2), "missing a required argument: 'alpha'"),
        (lambda: partition("iid", np.arange(7), 2, alpha=0.5), "unknown option.*alpha"),
    ],
)
def test_partitioners_reject_bad_input(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_label_histograms_and_table():
    y = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    hist = label_histograms(y, parts)
    assert hist.tolist() == [[2, 1, 0], [0, 0, 3]]
    assert label_histograms(y, parts, num_classes=5).shape == (2, 5)
    with pytest.raises(ValueError, match="label 2 does not fit num_classes=2"):
        label_histograms(y, parts, num_classes=2)
    assert mean_top_class_share(hist) == pytest.approx((2 / 3 + 1) / 2)
    table = format_histograms(hist)
    assert table.splitlines()[1].split()[:3] == ["0", "3", "66.7"] and "mean top-class share 0.833" in table
