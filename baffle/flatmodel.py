"""A model whose parameters are views into one flat float32 buffer.

Zeroth-order probing evaluates L at many weight vectors W + sigma z_k. With the
parameters viewing one buffer, installing a candidate vector is one fused
``storage = W + s z`` of n floats.

Two orders of the same n numbers:
- logical: the parameters flattened row-major in module order. This is the order
  of the direction stream (:class:`baffle.perturb.Layout`), of every weight vector
  the library passes around, of uploads and of saved weights. It never changes.
- physical: the order inside ``storage``. 4-D convolution weights are stored
  channels-last, (O, kh, kw, I), because oneDNN convolutions run 1.2-2.5x faster
  with such weights on this CPU (LeNet batch 320: 13.2 -> 5.4 ms compiled).
  ``to_physical`` is a fixed gather between the two.
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

    def __init__(self, module: nn.Module, channels_last: bool = True):
        if any(True for _ in module.buffers()):
            raise ValueError("model has buffers; baffle models must be buffer-free (use GroupNorm, not BatchNorm)")
        self.module = module
        params = list(module.named_parameters())
        self.layout = Layout.from_shapes([(name, p.shape) for name, p in params])
        n = self.layout.size
        self.storage = torch.empty(n, dtype=torch.float32)
        order = torch.arange(n)  # order[physical position] = logical position
        for (name, p), (_, shape, a, b) in zip(params, self.layout.slices()):
            if channels_last and len(shape) == 4:
                o, i, kh, kw = shape
                view = torch.as_strided(self.storage, shape, (i * kh * kw, 1, kw * i, i), a)
                order[a:b] = torch.arange(a, b).view(shape).permute(0, 2, 3, 1).reshape(-1)
            else:
                view = self.storage[a:b].view(shape)
            view.copy_(p.detach())
            p.requires_grad_(False)
            p.data = view
        self._order = None if torch.equal(order, torch.arange(n)) else order

    @property
    def n(self) -> int:
        return self.storage.numel()

    def weights(self) -> torch.Tensor:
        """A copy of the current weights in logical order."""
        if self._order is None:
            return self.storage.clone()
        return torch.empty_like(self.storage).index_copy_(0, self._order, self.storage)

    def to_physical(self, v: torch.Tensor) -> torch.Tensor:
        """Logical -> physical order along the last dimension (a gather; no-op if equal)."""
        return v if self._order is None else v.index_select(-1, self._order)

    def load(self, w: torch.Tensor) -> None:
        """Install logical weights w into the model."""
        if self._order is None:
            self.storage.copy_(w)
        else:
            torch.index_select(w, 0, self._order, out=self.storage)

    def named(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a logical flat vector as {parameter name: tensor}."""
        return {name: w[a:b].view(shape) for name, shape, a, b in self.layout.slices()}

    @torch.no_grad()
    def loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean cross-entropy at weights w: one forward pass (per-example fp32 losses
        averaged in float64, as :class:`baffle.engine.Engine` does)."""
        self.load(w)
        return float(F.cross_entropy(self.module(x), y, reduction="none").double().mean())

    def grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Backpropagation baseline: (flat gradient, loss) at w."""
        leaf = w.detach().clone().requires_grad_(True)
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
