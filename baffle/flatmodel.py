"""A model whose parameters are views into one flat float32 vector.

Zeroth-order probing evaluates L at many weight vectors W + sigma z_k. With the
parameters viewing one buffer, installing a candidate vector is one copy of n
floats, and the direction stream's flat layout (:class:`baffle.perturb.Layout`) is
simply the parameter order of the module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .perturb import Layout


@dataclass(frozen=True)
class Evaluation:
    loss: float
    top1: float
    top5: float


class FlatModel:
    """Wraps ``module`` so that all its parameters live in ``self.flat`` (length n).

    ``loss(w, x, y)`` is a forward pass only (no autograd graph); ``grad`` is the
    backpropagation baseline. The module must have no buffers: BAFFLE never
    perturbs statistics, and a stateless forward keeps L(W) a pure function of W.
    """

    def __init__(self, module: nn.Module):
        if any(True for _ in module.buffers()):
            raise ValueError("model has buffers; baffle models must be buffer-free (use GroupNorm, not BatchNorm)")
        self.module = module
        params = list(module.named_parameters())
        self.layout = Layout.from_shapes([(name, p.shape) for name, p in params])
        self.flat = torch.cat([p.detach().reshape(-1).float() for _, p in params]).clone()
        for (name, p), (_, shape, a, b) in zip(params, self.layout.slices()):
            p.requires_grad_(False)
            p.data = self.flat[a:b].view(shape)

    @property
    def n(self) -> int:
        return self.flat.numel()

    def load(self, w: torch.Tensor) -> None:
        if w.data_ptr() != self.flat.data_ptr():
            self.flat.copy_(w)

    def named(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector as {parameter name: tensor}."""
        return {name: w[a:b].view(shape) for name, shape, a, b in self.layout.slices()}

    @torch.no_grad()
    def loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean cross-entropy at weights w: one forward pass (per-example fp32 losses
        averaged in float64, as :class:`baffle.engine.Engine` does)."""
        self.load(w)
        return float(F.cross_entropy(self.module(x), y, reduction="none").double().mean())

    def grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Backpropagation baseline: (flat gradient, loss) at w."""
        self.load(w)
        leaf = self.flat.detach().requires_grad_(True)
        out = torch.func.functional_call(self.module, self.named(leaf), (x,))
        loss = F.cross_entropy(out, y)
        (g,) = torch.autograd.grad(loss, leaf)
        return g.detach(), float(loss.detach())

    @torch.no_grad()
    def evaluate(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> Evaluation:
        """Test loss, top-1 and top-5 accuracy of weights w over (x, y)."""
        self.load(w)
        loss = top1 = top5 = 0.0
        for i in range(0, len(y), batch):
            out = self.module(x[i : i + batch])
            yb = y[i : i + batch]
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            top1 += float((top[:, 0] == yb).sum())
            top5 += float((top == yb[:, None]).any(1).sum())
        n = max(1, len(y))
        return Evaluation(loss / n, top1 / n, top5 / n)
