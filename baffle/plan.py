"""The probe plan: what a client needs to probe (torch-free).

A round's probe is fixed by (seed, K, sigma, scheme, stream): the directions
z_1..z_K are regenerated from ``seed`` and ``stream`` by :mod:`baffle.perturb`.
This module imports neither torch nor anything that does, so the inference-only
client (:mod:`baffle.edge`) validates the same record the torch client uses.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from dataclasses import dataclass

SCHEMES = ("forward", "central")
SEED_LIMIT = 2**64  # seeds key Philox4x32-10 with 64 bits


@dataclass(frozen=True)
class ProbePlan:
    """What a client needs to probe: the server -> client half of a FedSGD round.

    seed: round seed keying the direction stream, an integer in [0, 2^64);
    stream: purpose word (local step), an integer in [0, 2^32).
    """

    seed: int
    num_perturbations: int
    sigma: float
    scheme: str = "forward"
    stream: int = 0

    def __post_init__(self) -> None:
        for name, limit in (("seed", SEED_LIMIT), ("stream", 2**32)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < limit:
                raise ValueError(f"{name} must be an integer in [0, 2^{limit.bit_length() - 1}), got {value!r}")
        k = self.num_perturbations
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ValueError(f"num_perturbations (K) must be an integer >= 1, got {k!r}")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, Real) or not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r} (choose from {', '.join(SCHEMES)})")

    @property
    def forward_passes(self) -> int:
        """Forward passes one probe costs: K+1 (forward) or 2K (central)."""
        k = self.num_perturbations
        return k + 1 if self.scheme == "forward" else 2 * k
