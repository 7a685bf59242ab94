"""Aggregation of client uploads: the server only ever needs a weighted sum.

    aggregate = sum_c (N_c / N) v_c,   N = sum_c N_c over the clients of the round

Every server-side quantity (Stein's g_hat, the mean gradient, the FedAvg delta) is
linear in it, which is what lets secure aggregation replace this plain sum.
"""
from __future__ import annotations

from typing import Sequence

import torch


def client_weights(sizes: Sequence[int]) -> list[float]:
    """N_c / N for the clients of a round."""
    total = float(sum(sizes))
    if total <= 0:
        raise ValueError(f"client sizes must sum to > 0, got {list(sizes)}")
    return [s / total for s in sizes]


def weighted_sum(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_c w_c v_c in float64, returned as float32."""
    if len(vectors) != len(weights) or not vectors:
        raise ValueError(f"need one weight per vector, got {len(vectors)} vectors and {len(weights)} weights")
    shape = vectors[0].shape
    out = torch.zeros(shape, dtype=torch.float64)
    for v, w in zip(vectors, weights):
        if v.shape != shape:
            raise ValueError(f"upload of shape {tuple(v.shape)} does not match {tuple(shape)}")
        out.add_(v.to(torch.float64), alpha=w)
    return out.to(torch.float32)
