"""Portable seeded Gaussian directions (NumPy half; imports no torch).

Server and clients must draw bit-identical perturbations z_k ~ N(0, I_n) on any
machine or runtime. ``torch.randn`` promises nothing across devices or versions,
so baffle specifies its own stream:

Generator
    Philox4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as
    1, 2, 3"): a counter-based generator; output = bijection_key(counter), so any
    block of any direction can be produced alone (no state, no K*n memory).

    key     = (seed mod 2^32, seed >> 32)                      64-bit seed
    counter = (j, k, stream, 0)                                 four uint32 words
              j      = block index: positions 4j .. 4j+3 of the flat vector
              k      = direction index 0..K-1
              stream = purpose word (e.g. FedAvg local step), 0 by default

Uniform to normal (Box-Muller, evaluated in float64, rounded once to float32)
    (w0, w1, w2, w3) = Philox(counter)
    u1 = (w0 + 1) / 2^32  in (0, 1],   u2 = w1 / 2^32  in [0, 1)
    z[4j]   = sqrt(-2 ln u1) cos(2 pi u2)
    z[4j+1] = sqrt(-2 ln u1) sin(2 pi u2)
    and (w2, w3) give z[4j+2], z[4j+3] the same way.

Portability bound: Philox is exact integer arithmetic, so the words agree bit for
bit everywhere. log/cos/sin are computed in float64, where libms differ by at most
an ulp or two (about 2e-16 relative); rounding that to float32 gives the same
float32 except when the float64 value lies within that distance of a float32
rounding boundary (probability about 1e-8 per value), where the two results differ
by exactly 1 float32 ulp. So: z agrees across runtimes to within 1 float32 ulp, and
is bit-identical in all but ~1e-8 of positions. ``tests/test_perturb.py`` checks
NumPy against torch, and both against the published Philox known answers.

The flat vector of a model is its parameters flattened and concatenated in the
order given by the caller (see ``Layout``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MASK32 = 0xFFFFFFFF
ROUNDS = 10
TWO_PI = 2.0 * math.pi
INV_2_32 = 1.0 / 4294967296.0


def _mulhilo(a: Any, m: int) -> tuple[Any, Any]:
    """(hi, lo) 32-bit words of the 64-bit product a*m, for int64 arrays 0 <= a < 2^32.

    The product can exceed 2^63; int64 multiplication in NumPy arrays and torch
    tensors wraps modulo 2^64 (two's complement), so its bits are the exact
    unsigned product and the masks below recover both words. The same code thus
    serves NumPy and torch; the known-answer tests check it on every backend.
    """
    p = a * m
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(c0: Any, c1: Any, c2: Any, c3: Any, k0: int, k1: int) -> tuple[Any, Any, Any, Any]:
    """Philox4x32-10 on int64 arrays holding uint32 words (NumPy or torch).

    Round: (c0,c1,c2,c3) -> (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0)),
    then k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32); ten rounds.
    """
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def split_seed(seed: int) -> tuple[int, int]:
    """64-bit seed -> Philox key (low word, high word)."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed & MASK32, seed >> 32


def derive_seed(seed: int, *words: int) -> int:
    """A 64-bit seed for a purpose, e.g. derive_seed(run_seed, ROUND, t).

    Philox keyed by ``seed`` applied to the counter (words..., 0-padded to three
    words, then the word count), so (a,) and (a, 0) give different seeds: portable,
    and distinct word tuples give independent-looking seeds.
    """
    if len(words) > 3:
        raise ValueError(f"derive_seed takes at most 3 words, got {len(words)}")
    w = [int(x) & MASK32 for x in words] + [0] * (3 - len(words)) + [len(words)]
    out = philox4x32(*(np.array([x], dtype=np.int64) for x in w), *split_seed(seed))
    return int(out[0][0]) | (int(out[1][0]) << 32)


def block_range(start: int, stop: int) -> tuple[int, int]:
    """Philox blocks [j0, j1) that cover flat positions [start, stop)."""
    return start // 4, (stop + 3) // 4


def _check_slice(start: int, stop: int) -> None:
    if not 0 <= start <= stop:
        raise ValueError(f"direction slice must satisfy 0 <= start <= stop, got [{start}, {stop})")


CHUNK = 1 << 15  # counter values (rows x blocks) per generation step: bounds the temporaries


def chunks(rows: int, j0: int, j1: int):
    """Yield [a, b) sub-ranges of blocks [j0, j1) holding at most CHUNK counters over ``rows`` rows.

    The integer arithmetic keeps ~a dozen int64 temporaries per counter alive, so
    generating a whole WRN direction block at once would cost hundreds of MB;
    chunking keeps it at a few MB whatever n and the block size are.
    """
    step = max(1, CHUNK // max(1, rows))
    for a in range(j0, j1, step):
        yield a, min(j1, a + step)


def normals_np(seed: int, ks: Sequence[int] | np.ndarray, start: int, stop: int, stream: int = 0) -> np.ndarray:
    """z_k[start:stop] for every k in ``ks``: float32 array of shape (len(ks), stop-start)."""
    _check_slice(start, stop)
    k0, k1 = split_seed(seed)
    j0, j1 = block_range(start, stop)
    ks = np.asarray(ks, dtype=np.int64).reshape(-1, 1)
    out = np.empty((ks.shape[0], 4 * (j1 - j0)), dtype=np.float32)
    for a, b in chunks(ks.shape[0], j0, j1):
        j = np.arange(a, b, dtype=np.int64).reshape(1, -1)
        shape = (ks.shape[0], j.shape[1])
        c = (
            np.broadcast_to(j & MASK32, shape),
            np.broadcast_to(ks & MASK32, shape),
            np.full(shape, int(stream) & MASK32, dtype=np.int64),
            np.zeros(shape, dtype=np.int64),
        )
        w = philox4x32(*c, k0, k1)
        z = out[:, 4 * (a - j0) : 4 * (b - j0)].reshape(shape + (4,))
        for pair in (0, 1):
            r = np.sqrt(-2.0 * np.log((w[2 * pair] + 1) * INV_2_32))
            theta = TWO_PI * (w[2 * pair + 1] * INV_2_32)
            z[..., 2 * pair] = r * np.cos(theta)  # float64, rounded once to float32
            z[..., 2 * pair + 1] = r * np.sin(theta)
    off = start - 4 * j0
    return out[:, off : off + (stop - start)]


@dataclass(frozen=True)
class Layout:
    """Where each named tensor sits in the flat parameter vector.

    entries: (name, shape, offset) in the order the direction stream uses.
    """

    entries: tuple[tuple[str, tuple[int, ...], int], ...]

    @classmethod
    def from_shapes(cls, shapes: Sequence[tuple[str, Sequence[int]]]) -> "Layout":
        entries, off = [], 0
        for name, shape in shapes:
            shape = tuple(int(s) for s in shape)
            entries.append((name, shape, off))
            off += int(np.prod(shape, dtype=np.int64))
        return cls(tuple(entries))

    @property
    def size(self) -> int:
        if not self.entries:
            return 0
        name, shape, off = self.entries[-1]
        return off + int(np.prod(shape, dtype=np.int64))

    def slices(self):
        """Yield (name, shape, start, stop) for each tensor."""
        for name, shape, off in self.entries:
            yield name, shape, off, off + int(np.prod(shape, dtype=np.int64))


def directions_np(seed: int, k: int, layout: Layout, stream: int = 0) -> dict[str, np.ndarray]:
    """z_k shaped like the parameters: {name: float32 array} (NumPy, no torch)."""
    return {
        name: normals_np(seed, [k], a, b, stream)[0].reshape(shape)
        for name, shape, a, b in layout.slices()
    }
