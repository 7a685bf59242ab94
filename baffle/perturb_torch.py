"""Portable seeded Gaussian directions, torch half.

Same stream as :mod:`baffle.perturb` (the specification lives there): the Philox
words come from the very same integer code, run on int64 tensors, so NumPy and
torch agree bit for bit on the words and within one float32 ulp on z (in practice
bit for bit; see the bound stated in ``baffle.perturb``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .perturb import INV_2_32, MASK32, TWO_PI, Layout, _check_slice, block_range, chunks, philox4x32, split_seed


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
    j0, j1 = block_range(start, stop)
    ks = torch.as_tensor(ks, dtype=torch.int64, device=device).reshape(-1, 1)
    words = torch.tensor([*split_seed(seed), int(stream) & MASK32], dtype=torch.int64, device=ks.device)
    flat = torch.empty((ks.shape[0], 4 * (j1 - j0)), dtype=torch.float32, device=ks.device)
    for a, b in chunks(ks.shape[0], j0, j1):  # bounded temporaries (see baffle.perturb.chunks)
        j = torch.arange(a, b, dtype=torch.int64, device=ks.device).reshape(1, -1)
        flat[:, 4 * (a - j0) : 4 * (b - j0)] = _normals_kernel(words, ks, j)
    off = start - 4 * j0
    return flat[:, off : off + (stop - start)]


def _normals_kernel(words: torch.Tensor, ks: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Blocks j of directions ks: (len(ks), 4 len(j)) float32. Tensors only (key and
    stream in ``words``), so one torch.compile of it serves every seed."""
    shape = (ks.shape[0], j.shape[1])
    c = (
        (j & MASK32).expand(shape),
        (ks & MASK32).expand(shape),
        words[2].expand(shape),
        torch.zeros(shape, dtype=torch.int64, device=ks.device),
    )
    w = philox4x32(*c, words[0], words[1])
    pairs = []
    for pair in (0, 1):
        r = torch.sqrt(-2.0 * torch.log((w[2 * pair] + 1).double() * INV_2_32))
        theta = TWO_PI * (w[2 * pair + 1].double() * INV_2_32)
        pairs += [r * torch.cos(theta), r * torch.sin(theta)]
    # one stack (not four strided writes) so that torch.compile fuses it into one loop
    return torch.stack(pairs, dim=-1).to(torch.float32).reshape(shape[0], -1)


class CompiledDirections:
    """flat_directions through a torch.compile'd kernel (same numbers, fused loops).

    Shapes are kept fixed: a block is always generated ``block`` rows tall (a short
    last block is padded with extra k and sliced), so the kernel compiles once per
    (block, n) and never again for a new seed.
    """

    def __init__(self, block: int):
        self.block = block
        self._kernel = torch.compile(_normals_kernel, dynamic=False)

    def __call__(self, seed: int, ks, n: int, stream: int = 0, device=None) -> torch.Tensor:
        ks = torch.as_tensor(ks, dtype=torch.int64, device=device).reshape(-1)
        rows = ks.numel()
        if rows < self.block:
            ks = torch.cat([ks, ks.new_zeros(self.block - rows)])
        j = torch.arange(0, (n + 3) // 4, dtype=torch.int64, device=ks.device).reshape(1, -1)
        words = torch.tensor([*split_seed(seed), int(stream) & MASK32], dtype=torch.int64, device=ks.device)
        return self._kernel(words, ks.reshape(-1, 1), j)[:rows, :n]


def flat_directions(
    seed: int, ks: Sequence[int] | torch.Tensor, n: int, stream: int = 0, device=None
) -> torch.Tensor:
    """Whole flat directions z_k for k in ``ks``: (len(ks), n) float32."""
    return normals(seed, ks, 0, n, stream, device)


def directions(seed: int, k: int, layout: Layout, stream: int = 0, device=None) -> dict[str, torch.Tensor]:
    """z_k shaped like the parameters: {name: float32 tensor}."""
    flat = normals(seed, [k], 0, layout.size, stream, device)[0]
    return {name: flat[a:b].view(shape) for name, shape, a, b in layout.slices()}
