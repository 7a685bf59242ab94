"""Fast evaluation of many perturbed losses on one batch (the client's hot loop).

A probe needs L(W + s z_i) for a block of directions z_1..z_b on one batch. Exact
estimators cannot share FLOPs between perturbations (only L(W) is shared), so the
limit is b plain forward passes at the machine's best throughput. Engines:

    loop      per direction: write W + s z_i into the model's parameter storage
              (z_i is gathered into the storage's physical order one row at a time,
              see :mod:`baffle.flatmodel`; then one fused add), one eager forward.
              Memory: n + activations.
    compiled  the same loop through torch.compile'd forward and direction generator
              (Inductor fuses the small convolutions' epilogues and the Philox rounds;
              compiles once per batch shape, a few seconds). Same memory as loop.
    vmap      the block at once: torch.func.vmap over b stacked perturbed parameter
              vectors. Memory: b x (n + activations); bounded by the block size.

All return the same losses up to float rounding (tests/test_engine.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .flatmodel import FlatModel
from .perturb_torch import CompiledDirections, flat_directions

ENGINES = ("loop", "compiled", "vmap")
Directions = Callable[..., torch.Tensor]


def _check(name: str) -> None:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")


class Engine:
    """Evaluates per-segment mean losses of a FlatModel at perturbed weights."""

    def __init__(self, model: FlatModel, name: str = "loop", block: int = 8):
        _check(name)
        self.model = model
        self.name = name
        self._forward = model.module
        self.directions: Directions = flat_directions
        self.forward_passes = 0  # counted where they happen: one per forward of the model
        if name == "compiled":
            self._forward = torch.compile(model.module, dynamic=False)
            self.directions = CompiledDirections(block)

    @staticmethod
    def _segment_means(per: torch.Tensor, segment: torch.Tensor, groups: int) -> torch.Tensor:
        """Mean of per-example losses (..., B) over each segment: (..., groups), float64."""
        per = per.double()
        sums = per.new_zeros((*per.shape[:-1], groups)).index_add_(per.dim() - 1, segment, per)
        return sums / torch.bincount(segment, minlength=groups).double()

    def _losses(self, x: torch.Tensor, y: torch.Tensor, segment: torch.Tensor, groups: int) -> torch.Tensor:
        return self._segment_means(F.cross_entropy(self._forward(x), y, reduction="none"), segment, groups)

    @torch.no_grad()
    def losses(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, segment: torch.Tensor,
               groups: int) -> torch.Tensor:
        """Per-segment mean loss at W itself: shape (groups,)."""
        self.model.load(w)
        self.forward_passes += 1
        return self._losses(x, y, segment, groups)

    @torch.no_grad()
    def perturbed_losses(self, w: torch.Tensor, z: torch.Tensor, scale: float, x: torch.Tensor, y: torch.Tensor,
                         segment: torch.Tensor, groups: int) -> torch.Tensor:
        """Per-segment mean losses at W + scale * z_i for each row z_i: shape (b, groups)."""
        self.forward_passes += z.shape[0]
        if self.name == "vmap":
            return self._vmap_losses(w, z, scale, x, y, segment, groups)
        out = torch.empty(z.shape[0], groups, dtype=torch.float64)
        storage = self.model.storage
        wp = self.model.to_physical(w)
        if wp.data_ptr() == storage.data_ptr():
            raise ValueError("w must not be the model's own parameter buffer (it is overwritten per direction)")
        for i in range(z.shape[0]):
            # one row at a time into physical order: memory n, not another block
            torch.add(wp, self.model.to_physical(z[i]), alpha=scale, out=storage)
            out[i] = self._losses(x, y, segment, groups)
        return out

    def _vmap_losses(self, w, z, scale, x, y, segment, groups):
        model = self.model

        def one(v: torch.Tensor) -> torch.Tensor:
            logits = torch.func.functional_call(model.module, model.named(v), (x,))
            return F.cross_entropy(logits, y, reduction="none")

        return self._segment_means(torch.func.vmap(one)(torch.add(w, z, alpha=scale)), segment, groups)
