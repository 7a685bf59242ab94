"""Split a labelled dataset across federated clients.

Every partitioner returns ``num_clients`` sorted int64 index arrays that are
disjoint and together cover ``range(len(labels))`` exactly once.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ._base import DataError

Partitioner = Callable[..., list[np.ndarray]]


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator, **_: object) -> list[np.ndarray]:
    """A random permutation cut into ``num_clients`` pieces whose sizes differ by at most 1."""
    return _finish(np.array_split(rng.permutation(len(labels)), num_clients))


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random examples from the largest client to the smallest until all have ``min_size``.

    Each step either fills the smallest client or brings the largest down to
    ``min_size``, so it ends after at most ``2 * num_clients`` steps whenever
    ``num_clients * min_size <= N`` (then the largest always has a surplus).
    """
    sizes = np.array([len(p) for p in parts])
    while sizes.min() < min_size:
        small, big = int(sizes.argmin()), int(sizes.argmax())
        take = min(min_size - sizes[small], sizes[big] - min_size)
        chosen = rng.choice(sizes[big], size=take, replace=False)
        keep = np.ones(sizes[big], dtype=bool)
        keep[chosen] = False
        parts[small] = np.concatenate([parts[small], parts[big][chosen]])
        parts[big] = parts[big][keep]
        sizes[small] += take
        sizes[big] -= take
    return parts


def dirichlet_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator, *,
                        alpha: float = 0.5, min_size: int = 1, **_: object) -> list[np.ndarray]:
    """Label skew: for each class ``c``, ``q_c ~ Dir(alpha * 1_K)`` over the ``K`` clients.

    Class ``c``'s shuffled examples are cut at ``floor(cumsum(q_c) * n_c)``; small
    ``alpha`` gives each client few classes, large ``alpha`` approaches iid. Drawn
    once (no resampling loop), then :func:`_top_up` guarantees ``min_size`` per client.
    """
    if num_clients * min_size > len(labels):
        raise DataError(f"num_clients * min_size ({num_clients} * {min_size}) exceeds the {len(labels)} examples")
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        q = rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(q)) or q.sum() <= 0:  # defensive: extreme alpha underflow
            q = np.eye(num_clients)[rng.integers(num_clients)]
        cuts = np.minimum((np.cumsum(q)[:-1] * len(idx)).astype(np.int64), len(idx))
        for client, piece in enumerate(np.split(idx, cuts)):
            buckets[client].append(piece)
    parts = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
    return _finish(_top_up(parts, min_size, rng))


def shards_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator, *,
                     shards_per_client: int = 2, **_: object) -> list[np.ndarray]:
    """McMahan et al. pathological non-iid: sort by label, cut ``K * s`` shards, deal ``s`` per client.

    Within a label the order is shuffled first. Shard sizes differ by at most 1
    (``np.array_split``), so no remainder is dropped: every example is covered.
    """
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise DataError(f"num_clients * shards_per_client ({num_clients} * {shards_per_client}) "
                        f"exceeds the {len(labels)} examples")
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([shards[s] for s in row]) for row in deal])


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "shards": shards_partition,
}


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _validate(labels: np.ndarray, num_clients: int, scheme: str, alpha: float,
              shards_per_client: int, min_size: int) -> None:
    if scheme not in PARTITIONERS:
        raise DataError(f"unknown partition scheme {scheme!r}; known: {', '.join(sorted(PARTITIONERS))}")
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if not _is_int(num_clients) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > len(labels):
        raise DataError(f"more clients ({num_clients}) than examples ({len(labels)})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise DataError(f"alpha must be finite and > 0, got {alpha!r}")
    if not _is_int(shards_per_client) or shards_per_client < 1:
        raise DataError(f"shards_per_client must be a positive integer, got {shards_per_client!r}")
    if not _is_int(min_size) or min_size < 0:
        raise DataError(f"min_size must be a non-negative integer, got {min_size!r}")


def partition(labels: np.ndarray, num_clients: int, scheme: str, rng: np.random.Generator, *,
              alpha: float = 0.5, shards_per_client: int = 2, min_size: int = 1) -> list[np.ndarray]:
    """Client index arrays for ``labels`` under ``scheme`` (a key of :data:`PARTITIONERS`).

    ``alpha`` and ``min_size`` are used by ``dirichlet`` (``iid`` and ``shards`` are
    balanced by construction), ``shards_per_client`` by ``shards``. The same
    ``rng`` state gives the same partition.
    """
    labels = np.asarray(labels)
    _validate(labels, num_clients, scheme, alpha, shards_per_client, min_size)
    return PARTITIONERS[scheme](labels, int(num_clients), rng, alpha=float(alpha),
                                shards_per_client=int(shards_per_client), min_size=int(min_size))


def label_summary(labels: np.ndarray, parts: list[np.ndarray], num_classes: int, *, top: int = 3) -> str:
    """Text table, one row per client (``size`` then count per class) and a ``total`` row.

    With more than 10 classes the per-class columns are replaced by the client's
    ``top`` most frequent classes as ``class:count``.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        counts[i] = np.bincount(labels[p], minlength=num_classes)
    rows = [(str(i), c) for i, c in enumerate(counts)] + [("total", counts.sum(axis=0))]
    width = max(5, len(str(int(counts.sum())) if counts.size else "0") + 1)
    if num_classes <= 10:
        header = f"{'client':>6} {'size':>{width}}" + "".join(f"{k:>{width}}" for k in range(num_classes))
        lines = [f"{name:>6} {int(c.sum()):>{width}}" + "".join(f"{int(v):>{width}}" for v in c) for name, c in rows]
    else:
        header = f"{'client':>6} {'size':>{width}}  top classes (class:count)"
        lines = []
        for name, c in rows:
            best = [k for k in np.argsort(-c, kind="stable")[:top] if c[k] > 0]
            lines.append(f"{name:>6} {int(c.sum()):>{width}}  " + " ".join(f"{k}:{int(c[k])}" for k in best))
    return "\n".join([header, *lines])
