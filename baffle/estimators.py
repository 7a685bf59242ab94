"""Zeroth-order gradient estimators, split along the client/server line.

Client half, :func:`probe` (forward passes only, O(n) memory):
    forward ("twice-FD", K+1 passes):  u_k = (L(W + sigma z_k) - L(W)) / sigma
    central (2K passes):               u_k = (L(W + sigma z_k) - L(W - sigma z_k)) / (2 sigma)
It uploads the K directional derivatives u_k (not the raw differences d_k: u_k does
not depend on sigma and is O(|grad|), which fixed-point secure aggregation needs).

Server half, :func:`combine` (Stein's identity, O(n) memory streaming over k):
    g_hat = (1/K) sum_k u_k z_k
For z ~ N(0, I), E[z z^T] = I, so E[g_hat] = grad L_sigma(W), the gradient of the
Gaussian-smoothed loss L_sigma(W) = E_z L(W + sigma z) (Nesterov & Spokoiny 2017;
BAFFLE, Feng et al. 2023, eq. 3-5). Its relative error shrinks like sqrt(n / K):
E[cos(g_hat, g)] ~ sqrt(K / (K + n + 1)) for a linear loss.

g_hat is linear in u, so the server only ever needs the weighted sum of the
clients' u vectors: exactly what (secure) aggregation delivers.

Directions z_k are regenerated from the round seed by the portable stream in
:mod:`baffle.perturb`; at most ``block`` of them are held at once (block x n floats).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .perturb import Layout
from .plan import SCHEMES, ProbePlan  # noqa: F401  (re-exported: the plan is part of this API)
from .perturb_torch import flat_directions

FlatLoss = Callable[[torch.Tensor], "float | torch.Tensor"]


def _blocks(k: int, block: int):
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    for a in range(0, k, block):
        yield a, min(k, a + block)


BlockLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class ProbeResult:
    """u: (K,) or (K, clients) float32; g: g_hat or None; loss_at_w: L(W) (per client)."""

    u: torch.Tensor
    g: torch.Tensor | None
    loss_at_w: torch.Tensor


def probe(loss: FlatLoss, w: torch.Tensor, plan: ProbePlan, block: int = 8) -> torch.Tensor:
    """Client half: the K directional derivatives u (float32, shape (K,)).

    ``loss(v)`` evaluates L at the flat weight vector v (forward pass only).
    Memory: w, one perturbed copy and ``block`` directions: (block + 2) x n floats.
    """
    return probe_blocks(loss, _rowwise(loss), w, plan, block).u


def probe_and_combine(loss: FlatLoss, w: torch.Tensor, plan: ProbePlan, block: int = 8):
    """(u, g_hat) in one pass: each block of directions is generated once and used
    both to probe and to accumulate g_hat (a client that steps locally needs both)."""
    result = probe_blocks(loss, _rowwise(loss), w, plan, block, accumulate=True)
    return result.u, result.g


def _rowwise(loss: FlatLoss) -> BlockLoss:
    """A block loss from a single-vector loss: L(w + s z_i) row by row."""

    def block_loss(w: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
        wp = torch.empty_like(w)
        return torch.stack([_f64(loss(torch.add(w, zi, alpha=scale, out=wp))) for zi in z])

    return block_loss


def probe_blocks(base_loss: FlatLoss, block_loss: BlockLoss, w: torch.Tensor, plan: ProbePlan, block: int,
                 accumulate: bool = False, directions: Callable[..., torch.Tensor] = None):
    """The probe loop over blocks of ``block`` directions, for any evaluation engine.

    ``block_loss(w, z, s)`` returns the losses at w + s z_i for the rows z_i of z
    (shape (b,) or (b, clients) when several clients share the forward, see
    :mod:`baffle.engine`); u then has shape (K,) or (K, clients). ``directions`` is
    the generator (default :func:`baffle.perturb_torch.flat_directions`).
    g_hat (``accumulate``) needs a scalar loss.
    """
    directions = directions or flat_directions
    n, sigma, k = w.numel(), plan.sigma, plan.num_perturbations
    base = _f64(base_loss(w)) if plan.scheme == "forward" else None
    loss_at_w = base
    u = None
    g = torch.zeros(n, dtype=torch.float32, device=w.device) if accumulate else None
    for a, b in _blocks(k, block):
        z = directions(plan.seed, torch.arange(a, b), n, plan.stream, w.device)
        plus = block_loss(w, z, sigma)
        if base is not None:
            ub = (plus - base) / sigma
        else:
            minus = block_loss(w, z, -sigma)
            ub = (plus - minus) / (2 * sigma)
            if loss_at_w is None:  # (L(W + s z) + L(W - s z)) / 2 = L(W) + O(s^2)
                loss_at_w = (plus[0] + minus[0]) / 2
        if u is None:
            u = torch.empty((k, *ub.shape[1:]), dtype=torch.float64)
        u[a:b] = ub
        if g is not None:
            g.addmv_(z.T, ub.reshape(b - a).to(w.device, torch.float32))
    return ProbeResult(u.to(torch.float32), g.div_(k) if g is not None else None, loss_at_w)


def _f64(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def combine(u: torch.Tensor, n: int, plan: ProbePlan, block: int = 8, device=None) -> torch.Tensor:
    """Server half: g_hat = (1/K) sum_k u_k z_k as a flat float32 vector of length n."""
    k = plan.num_perturbations
    if u.shape != (k,):
        raise ValueError(f"expected {k} scalars, got shape {tuple(u.shape)}")
    g = torch.zeros(n, dtype=torch.float32, device=device)
    u = u.to(device=device, dtype=torch.float32)
    for a, b in _blocks(k, block):
        z = flat_directions(plan.seed, torch.arange(a, b), n, plan.stream, device)
        g.addmv_(z.T, u[a:b])
    return g.div_(k)


# ---- dict-of-tensors convenience layer -------------------------------------------------

def layout_of(params: Mapping[str, torch.Tensor]) -> Layout:
    """The flat layout of a parameter dict, in its iteration order."""
    return Layout.from_shapes([(name, p.shape) for name, p in params.items()])


def flatten(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params.values()])


def unflatten(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    return {name: flat[a:b].view(shape) for name, shape, a, b in layout.slices()}


def zo_gradient(
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor | float],
    params: Mapping[str, torch.Tensor],
    num_perturbations: int,
    sigma: float = 1e-4,
    seed: int = 0,
    scheme: str = "forward",
    stream: int = 0,
    block: int = 8,
) -> dict[str, torch.Tensor]:
    """Zeroth-order gradient estimate shaped like ``params`` (probe + combine in one call).

    ``loss_fn(params_dict)`` must return the scalar loss; it is only ever called
    under ``torch.no_grad()`` with perturbed copies of the parameters.
    """
    plan = ProbePlan(seed, num_perturbations, sigma, scheme, stream)
    layout = layout_of(params)
    w = flatten(params)

    def flat_loss(v: torch.Tensor) -> float:
        with torch.no_grad():
            return float(loss_fn(unflatten(v, layout)))

    _, g = probe_and_combine(flat_loss, w, plan, block)
    return {name: t.clone() for name, t in unflatten(g, layout).items()}
