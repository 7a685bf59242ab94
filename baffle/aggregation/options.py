"""How a run uses secure aggregation (see :mod:`baffle.aggregation.secure`).

The simulator hands every round's uploads to :meth:`SecureOptions.aggregate`, which
runs the whole protocol in process: clients encode N_c/N * v_c in fixed point, mask
it, and the server only ever sees masked vectors, ciphertexts and shares. A round
whose survivors fall below the threshold is skipped (the model stays unchanged).

Randomness: keys, masks and the simulated dropouts come from a stream seeded by the
run seed and the round, so a simulated run is reproducible and resumable. That makes
the keys predictable to anyone who knows the seed: fine for measuring the protocol's
effect on training, not for secrecy, where each client must draw from os.urandom.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .secure import SecureAggConfig, SecureSumResult, default_threshold, secure_weighted_sum


@dataclass(frozen=True)
class SecureOptions:
    fraction_bits: int = 24
    clip: float = 64.0
    threshold: int = 0  # 0: an honest majority of the round, floor(n/2) + 1
    dropout: float = 0.0  # fraction of each round's clients that vanish before uploading

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ValueError(f"secagg_dropout must be in [0, 1), got {self.dropout}")
        if self.threshold < 0:
            raise ValueError(f"secagg_threshold must be >= 0, got {self.threshold}")

    def config(self, num_clients: int) -> SecureAggConfig:
        """The protocol's parameters for a round of ``num_clients`` (validated there)."""
        return SecureAggConfig(num_clients=num_clients, threshold=self.threshold or default_threshold(num_clients),
                               fraction_bits=self.fraction_bits, clip=self.clip)

    def aggregate(self, clients: Sequence[int], vectors: Sequence[torch.Tensor], weights: Sequence[float],
                  round: int, seed: int) -> SecureSumResult:
        """The secure weighted sum of one round; a seeded share of clients drops after key sharing."""
        rng = np.random.default_rng(seed)
        n_drop = int(round_half_up(self.dropout * len(clients)))
        dropped = rng.choice(len(clients), size=n_drop, replace=False) if n_drop else []
        return secure_weighted_sum(
            {c: v.detach().cpu().numpy().astype(np.float64) for c, v in zip(clients, vectors)},
            dict(zip(clients, weights)), self.config(len(clients)), round,
            drop_after={clients[i]: "share" for i in dropped}, random_bytes=rng.bytes)


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))
