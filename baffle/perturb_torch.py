"""Portable seeded Gaussian directions, torch half.

Same stream as :mod:`baffle.perturb` (the specification lives there): the Philox
words come from the very same integer code, run on int64 tensors, so NumPy and
torch agree bit for bit on the words and within one float32 ulp on z (in practice
bit for bit; see the bound stated in ``baffle.perturb``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .perturb import INV_2_32, MASK32, TWO_PI, Layout, _check_slice, block_range, philox4x32, split_seed


def normals(
    seed: int,
    ks: Sequence[int] | torch.Tensor,
    start: int,
    stop: int,
    stream: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """z_k[start:stop] for every k in ``ks``: float32 tensor of shape (len(ks), stop-start)."""
    _check_slice(start, stop)
    k0, k1 = split_seed(seed)
    j0, j1 = block_range(start, stop)
    ks = torch.as_tensor(ks, dtype=torch.int64, device=device).reshape(-1, 1)
    j = torch.arange(j0, j1, dtype=torch.int64, device=ks.device).reshape(1, -1)
    shape = (ks.shape[0], j.shape[1])
    c = (
        (j & MASK32).expand(shape),
        (ks & MASK32).expand(shape),
        torch.full(shape, int(stream) & MASK32, dtype=torch.int64, device=ks.device),
        torch.zeros(shape, dtype=torch.int64, device=ks.device),
    )
    w = philox4x32(*c, k0, k1)
    z = torch.empty(shape + (4,), dtype=torch.float64, device=ks.device)
    for pair in (0, 1):
        r = torch.sqrt(-2.0 * torch.log((w[2 * pair] + 1).double() * INV_2_32))
        theta = TWO_PI * (w[2 * pair + 1].double() * INV_2_32)
        z[..., 2 * pair] = r * torch.cos(theta)
        z[..., 2 * pair + 1] = r * torch.sin(theta)
    flat = z.reshape(shape[0], -1).to(torch.float32)
    off = start - 4 * j0
    return flat[:, off : off + (stop - start)]


def flat_directions(
    seed: int, ks: Sequence[int] | torch.Tensor, n: int, stream: int = 0, device=None
) -> torch.Tensor:
    """Whole flat directions z_k for k in ``ks``: (len(ks), n) float32."""
    return normals(seed, ks, 0, n, stream, device)


def directions(seed: int, k: int, layout: Layout, stream: int = 0, device=None) -> dict[str, torch.Tensor]:
    """z_k shaped like the parameters: {name: float32 tensor}."""
    flat = normals(seed, [k], 0, layout.size, stream, device)[0]
    return {name: flat[a:b].view(shape) for name, shape, a, b in layout.slices()}
