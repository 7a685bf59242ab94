"""Shamir secret sharing over the prime field F_p, p = 2^521 - 1 (a Mersenne prime).

A secret s in [0, p) becomes the constant term of a random polynomial of degree t - 1,

    f(X) = s + a_1 X + ... + a_{t-1} X^{t-1}   (mod p),   a_i uniform in F_p,

and the party at abscissa x (x != 0, all distinct) gets f(x). Any t points determine f,
hence s = f(0), by Lagrange interpolation at zero,

    s = sum_i lambda_i y_i,   lambda_i = prod_{j != i} x_j / (x_j - x_i)   (mod p);

any t - 1 points are independent of s (Shamir, "How to share a secret", CACM 1979).
The secure sum shares 32-byte seeds and X25519 private keys (< 2^256 < p) with it.
Plain Python integers: a few hundred shares per round cost milliseconds.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8): one field element on the wire

RandomBytes = Callable[[int], bytes]


def random_element(random_bytes: RandomBytes) -> int:
    """Uniform element of F_p by rejection sampling (rejects with probability 2^-521)."""
    while True:
        raw = random_bytes(SHARE_BYTES)
        if len(raw) != SHARE_BYTES:
            raise ValueError(f"random_bytes({SHARE_BYTES}) returned {len(raw)} bytes")
        v = int.from_bytes(raw, "big") & ((1 << 521) - 1)
        if v < PRIME:
            return v


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError(f"share abscissas must be distinct, got {sorted(xs)}")
    bad = [x for x in xs if not 0 < x < PRIME]
    if bad:
        raise ValueError(f"share abscissas must lie in [1, p), got {bad[:3]}")


def split(secret: int, xs: Sequence[int], threshold: int, random_bytes: RandomBytes) -> dict[int, int]:
    """Shares {x: f(x)} of ``secret`` for the abscissas ``xs``; any ``threshold`` recover it."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must lie in [0, 2^521 - 1)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}] for {len(xs)} shares, got {threshold}")
    _check_xs(xs)
    coeffs = [secret] + [random_element(random_bytes) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for a in reversed(coeffs):  # Horner
            acc = (acc * x + a) % PRIME
        out[x] = acc
    return out


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """lambda_i with f(0) = sum_i lambda_i f(x_i) for any f of degree < len(xs)."""
    _check_xs(xs)
    lams = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        lams.append(num * pow(den, -1, PRIME) % PRIME)
    return lams


def combine(points: Mapping[int, int]) -> int:
    """f(0) from the points {x: f(x)}; correct when there are at least ``threshold`` of them."""
    if not points:
        raise ValueError("need at least one share")
    xs = list(points)
    return sum(lam * points[x] for lam, x in zip(lagrange_at_zero(xs), xs)) % PRIME
