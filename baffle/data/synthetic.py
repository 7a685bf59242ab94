"""A small seeded classification problem for tests: class prototypes plus Gaussian noise."""

from __future__ import annotations

import math

import numpy as np
import torch

from ._base import ArrayDataset, DataError


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def make_synthetic(n_train: int = 2000, n_test: int = 500, *, image_size: int = 28, channels: int = 1,
                   num_classes: int = 10, noise: float = 2.0, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Seeded (train, test) pair named ``synthetic``.

    Class ``k`` has a prototype ``p_k ~ N(0, I)`` of shape ``(channels, image_size,
    image_size)``; an example is ``p_y + noise * e`` with ``e ~ N(0, I)`` and labels
    balanced (``i mod num_classes``, shuffled). Both splits share the prototypes and
    are then standardised per channel with the train split's mean/std. Prototypes of
    dimension ``D`` are about ``sqrt(2 D)`` apart, so with the defaults (D = 784,
    noise 2) a linear classifier (e.g. nearest class mean) is far above chance.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("image_size", image_size),
                        ("channels", channels), ("num_classes", num_classes)):
        _check_positive(name, value)
    if not (math.isfinite(noise) and noise >= 0):
        raise DataError(f"noise must be finite and >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    shape = (channels, image_size, image_size)
    prototypes = rng.standard_normal((num_classes, *shape), dtype=np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes)
        return prototypes[y] + np.float32(noise) * rng.standard_normal((n, *shape), dtype=np.float32), y

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    mean = xtr.mean(axis=(0, 2, 3), keepdims=True)
    std = xtr.std(axis=(0, 2, 3), keepdims=True) + np.float32(1e-8)

    def build(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        xs = torch.from_numpy(((x - mean) / std).astype(np.float32))
        return ArrayDataset(xs, torch.from_numpy(y.astype(np.int64)), num_classes, "synthetic")

    return build(xtr, ytr), build(xte, yte)


def load_synthetic(root: str | None = None, *, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Registry entry: :func:`make_synthetic` with its defaults; ``root`` is ignored."""
    return make_synthetic(seed=seed)
