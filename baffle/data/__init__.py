"""Datasets, client partitions and client sampling for BAFFLE.

``load_dataset(name, root)`` returns in-memory ``(train, test)``
:class:`ArrayDataset` pairs; nothing is downloaded or cached to disk.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ._base import ArrayDataset, DataError
from .cifar import load_cifar10, load_cifar100
from .idx import read_idx
from .mnist import fashion_mnist_dir, fetch_fashion_mnist_deb, load_fashion_mnist, load_mnist
from .partition import PARTITIONERS, label_summary, partition
from .synthetic import load_synthetic, make_synthetic

__all__ = [
    "DATASETS", "PARTITIONERS", "ArrayDataset", "DataError", "client_sampler", "fashion_mnist_dir",
    "fetch_fashion_mnist_deb", "label_summary", "load_cifar10", "load_cifar100", "load_dataset",
    "load_fashion_mnist", "load_mnist", "load_synthetic", "make_synthetic", "partition", "read_idx",
]

Loader = Callable[..., tuple[ArrayDataset, ArrayDataset]]

DATASETS: dict[str, Loader] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "synthetic": load_synthetic,
}


def load_dataset(name: str, root: str | None = None, *, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of dataset ``name`` (a key of :data:`DATASETS`; case and ``_``/``-`` are ignored).

    Each loader is called as ``loader(root, seed=seed)``; ``seed`` only matters for
    generated data (``synthetic``).
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[key](root, seed=seed)


def client_sampler(num_clients: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 ids of ``max(1, round(fraction * num_clients))`` distinct clients.

    ``round`` is Python's (half to even); ``fraction`` must lie in ``(0, 1]``.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) \
            or not math.isfinite(fraction) or not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], got {fraction!r}")
    count = max(1, round(fraction * num_clients))
    return np.sort(rng.choice(int(num_clients), size=count, replace=False)).astype(np.int64)
