"""CIFAR-10 / CIFAR-100 from the standard "python version" pickles.

Each file is a pickled dict with ``b"data"``: uint8 ``(N, 3072)`` (row-major
R, G, B planes of 32x32) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
(CIFAR-100). Unpickling runs code from the file: only load files you trust.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np

from ._base import ArrayDataset, DataError, make_dataset


@dataclass(frozen=True)
class CifarSpec:
    title: str
    name: str
    subdir: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarSpec("CIFAR-10", "cifar10", "cifar-10-batches-py",
                    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", 10,
                    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = CifarSpec("CIFAR-100", "cifar100", "cifar-100-python", ("train",), "test", "fine_labels", 100,
                     (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def cifar_dir(spec: CifarSpec, root: str | None) -> str:
    """``root`` itself if it holds the batch files, else ``root/<subdir>``."""
    if root is None:
        raise DataError(f"{spec.title} needs root: a directory holding {spec.subdir}/ (the python version)")
    if not os.path.isdir(root):
        raise DataError(f"{spec.title} root {root} does not exist")
    first = spec.train_files[0]
    for directory in (root, os.path.join(root, spec.subdir)):
        if os.path.isfile(os.path.join(directory, first)):
            return directory
    raise DataError(f"{spec.title} directory {root} has no {first} (expected the python version, {spec.subdir})")


def _field(batch: dict, key: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def read_cifar_batch(path: str, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(N, 3, 32, 32)`` and int64 labels of one pickle file, validated."""
    if not os.path.isfile(path):
        raise DataError(f"{spec.title} file {path} is missing")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(_field(batch, "data")), np.asarray(_field(batch, spec.label_key))
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, OverflowError) as e:
        raise DataError(f"{spec.title} file {path} is corrupt or not a {spec.title} pickle: {e!r}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{spec.title} file {path} has data {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{spec.title} file {path} has labels {labels.dtype} {labels.shape} for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{spec.title} file {path} has labels {labels.min()}..{labels.max()}, "
                        f"outside 0..{spec.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load(spec: CifarSpec, root: str | None) -> tuple[ArrayDataset, ArrayDataset]:
    directory = cifar_dir(spec, root)
    train = [read_cifar_batch(os.path.join(directory, f), spec) for f in spec.train_files]
    xte, yte = read_cifar_batch(os.path.join(directory, spec.test_file), spec)
    xtr, ytr = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    return (make_dataset(xtr, ytr, spec.num_classes, spec.name, spec.mean, spec.std),
            make_dataset(xte, yte, spec.num_classes, spec.name, spec.mean, spec.std))


def load_cifar10(root: str | None = None, *, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 50k/10k from ``root`` (``cifar-10-batches-py`` or its parent); ``seed`` is unused."""
    return _load(CIFAR10, root)


def load_cifar100(root: str | None = None, *, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-100 (fine labels) 50k/10k from ``root`` (``cifar-100-python`` or its parent); ``seed`` is unused."""
    return _load(CIFAR100, root)
