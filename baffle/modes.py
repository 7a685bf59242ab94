"""Communication modes, split along the client/server line.

FedSGD (batch level), round t:
    server -> client  RoundPlan(t, seed_t, W)
    client            u_c = probe(L_c on one local batch, W, seed_t)      (K scalars)
    client -> server  Upload(u_c)                                          4K bytes
    server            u = sum_c (N_c/N) u_c;  g_hat = combine(u, seed_t);  optimiser step
FedAvg (epoch level), round t:
    client            E local epochs of forward-only steps
                        W_c <- opt_c(W_c, g_hat_c(s)),  g_hat_c(s) from seed (seed_t, c, step s)
    client -> server  Upload(W_c - W)                                      4n bytes
    server            pseudo-gradient -sum_c (N_c/N)(W_c - W) into the server optimiser
                      (server SGD with lr 1 is plain FedAvg)

The backpropagation baseline runs the same two modes with autograd gradients in
place of the estimate: FedSGD uploads the n-float gradient, FedAvg the model delta.
Everything the server builds is linear in the uploaded vectors, so aggregation is
one weighted sum (see :mod:`baffle.aggregation`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .data import ArrayDataset
from .engine import Engine
from .estimators import SCHEMES, ProbePlan, combine, probe_blocks
from .perturb import derive_seed

MODES = ("fedsgd", "fedavg")
METHODS = ("baffle", "backprop")
OPTIMIZERS = ("sgd", "adam")
SEED_BYTES = 8
FLOAT_BYTES = 4

# purpose words for derive_seed: one per use of randomness
TAG_ROUND, TAG_DATA, TAG_LOCAL, TAG_SAMPLE, TAG_INIT, TAG_EVAL, TAG_SECURE = 1, 2, 3, 4, 5, 6, 7


@dataclass(frozen=True)
class Algorithm:
    """Everything a client must know to do its part of a round (fixed for a run)."""

    mode: str = "fedsgd"
    method: str = "baffle"
    num_perturbations: int = 100
    sigma: float = 1e-4
    scheme: str = "forward"
    batch_size: int = 32
    local_epochs: int = 1
    local_steps: int = 0  # FedAvg: cap on local steps per round (0 = full epochs)
    client_optimizer: str = "adam"
    client_lr: float = 0.01
    client_weight_decay: float = 0.0  # FedAvg: L2 coefficient added to the local gradient
    betas: tuple[float, float] = (0.9, 0.99)
    probe_block: int = 8

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("method", self.method, METHODS)
        _choice("scheme", self.scheme, SCHEMES)
        _choice("client_optimizer", self.client_optimizer, OPTIMIZERS)
        for name in ("num_perturbations", "batch_size", "local_epochs", "probe_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {self.local_steps}")
        if not self.sigma > 0 or not np.isfinite(self.sigma):
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not (self.client_lr > 0 and np.isfinite(self.client_lr)):
            raise ValueError(f"client_lr must be > 0, got {self.client_lr}")
        check_weight_decay("client_weight_decay", self.client_weight_decay)
        for b in self.betas:
            if not 0 <= b < 1:
                raise ValueError(f"betas must be in [0, 1), got {self.betas}")

    def probe_plan(self, seed: int, stream: int = 0) -> ProbePlan:
        return ProbePlan(seed, self.num_perturbations, self.sigma, self.scheme, stream)

    def uplink_floats(self, n: int) -> int:
        """Floats one client uploads per round."""
        if self.mode == "fedsgd" and self.method == "baffle":
            return self.num_perturbations
        return n


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r} (choose from {', '.join(options)})")


def check_weight_decay(name: str, value: float) -> None:
    if not (value >= 0 and np.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def make_optimizer(name: str, param: torch.nn.Parameter, lr: float, betas: tuple[float, float],
                   weight_decay: float = 0.0):
    """SGD or Adam over one flat parameter (no hidden schedule or clipping).

    ``weight_decay`` lambda is coupled L2, as torch's: the step uses g + lambda W (0: none).
    """
    _choice("optimizer", name, OPTIMIZERS)
    if name == "adam":
        return torch.optim.Adam([param], lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.SGD([param], lr=lr, weight_decay=weight_decay)


# ---- wire messages ------------------------------------------------------------------

@dataclass(frozen=True)
class RoundPlan:
    """Server -> client: the round number, its seed and the global weights."""

    round: int
    seed: int
    weights: torch.Tensor

    @property
    def nbytes(self) -> int:
        return FLOAT_BYTES * self.weights.numel() + SEED_BYTES


@dataclass(frozen=True)
class Upload:
    """Client -> server: one float32 vector (u, a gradient or a model delta)."""

    client: int
    round: int
    vector: torch.Tensor

    @property
    def nbytes(self) -> int:
        return FLOAT_BYTES * self.vector.numel()


@dataclass(frozen=True)
class ClientStats:
    """Local accounting, kept by the simulator, never sent."""

    forward_passes: int
    backward_passes: int
    train_loss: float


@dataclass(frozen=True)
class ClientProgress:
    """A FedAvg client's local state after its first ``step`` local steps of round ``round``:
    enough to finish the round as if it had never stopped (kept by the simulator, never sent).

    Step s's batch and directions depend only on (seed, client, round, s), so resuming at
    ``step`` with these weights, optimiser moments and counts gives the same delta bit for bit.
    """

    client: int
    round: int
    step: int
    weights: torch.Tensor
    optimizer: dict
    forward_passes: int
    loss_sum: float


# on_step(snapshot) after each FedAvg local step; snapshot() copies the progress so far, and is
# valid only during that call (it reads the live weights and optimiser state)
StepHook = Callable[[Callable[[], ClientProgress]], None]


# ---- client data ----------------------------------------------------------------------

@dataclass(frozen=True)
class ClientData:
    """A client's local examples and its seeded batch order.

    Epoch e visits the examples in the permutation seeded by (run seed, client, e);
    batch i of the client's stream is batch i % b of epoch i // b, with
    b = floor(N_c / B) full batches per epoch (a client smaller than B uses all it has).
    """

    client: int
    data: ArrayDataset
    seed: int

    def __len__(self) -> int:
        return len(self.data)

    def batches_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.data) // batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(self.seed, TAG_DATA, self.client, epoch))
        return rng.permutation(len(self.data))

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.batches_per_epoch(batch_size)
        epoch, i = divmod(index, per)
        idx = torch.from_numpy(self.epoch_order(epoch)[i * batch_size : (i + 1) * batch_size])
        return self.data.x[idx], self.data.y[idx]


# ---- client half ----------------------------------------------------------------------

def client_update(engine: Engine, data: ClientData, plan: RoundPlan, algo: Algorithm,
                  resume: ClientProgress | None = None, on_step: StepHook | None = None) -> tuple[Upload, ClientStats]:
    """What one client computes in a round, forward passes only for ``method='baffle'``.

    FedAvg only: ``resume`` continues the client from a :class:`ClientProgress`, and
    ``on_step(snapshot)`` is called after each local step, ``snapshot()`` returning a copy
    of the progress so far (taken only when called, during that call: the caller decides
    how often).
    """
    if algo.mode == "fedavg":
        return _fedavg_client(engine, data, plan, algo, resume, on_step)
    if resume is not None:
        raise ValueError(f"only a fedavg client resumes mid-round, not a {algo.mode} one")
    if algo.method == "baffle":
        return fedsgd_clients(engine, [data], plan, algo)[0]
    x, y = data.batch(plan.round, algo.batch_size)
    g, loss = engine.model.grad(plan.weights, x, y)
    return Upload(data.client, plan.round, g), ClientStats(1, 1, loss)


def _probe(engine: Engine, w: torch.Tensor, batches, plan: ProbePlan, algo: Algorithm, accumulate: bool = False):
    """Probe W on the concatenation of ``batches`` (one per client sharing z_k);
    returns (ProbeResult with u of shape (K, clients), forward passes per client)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    segment = torch.cat([torch.full((len(b[1]),), i, dtype=torch.int64) for i, b in enumerate(batches)])
    groups = len(batches)
    before = engine.forward_passes
    result = probe_blocks(
        lambda v: engine.losses(v, x, y, segment, groups),
        lambda v, z, s: engine.perturbed_losses(v, z, s, x, y, segment, groups),
        w, plan, algo.probe_block, accumulate=accumulate, directions=engine.directions,
    )
    return result, engine.forward_passes - before


def fedsgd_clients(engine: Engine, clients: list[ClientData], plan: RoundPlan,
                   algo: Algorithm) -> list[tuple[Upload, ClientStats]]:
    """FedSGD baffle for several clients at once, as a simulator may run them.

    All clients of a round share W and z_k, so their batches go through one forward
    per perturbation; each client still gets exactly its own u_c (its loss is the
    mean over its own rows), equal to probing alone up to float rounding. Each
    client is charged every forward pass it took part in (K+1 or 2K).
    """
    if algo.mode != "fedsgd" or algo.method != "baffle":
        raise ValueError(f"fedsgd_clients is for mode fedsgd with method baffle, got {algo.mode}/{algo.method}")
    batches = [c.batch(plan.round, algo.batch_size) for c in clients]
    result, passes = _probe(engine, plan.weights, batches, algo.probe_plan(plan.seed), algo)
    return [(Upload(c.client, plan.round, result.u[:, i].contiguous()),
             ClientStats(passes, 0, float(result.loss_at_w[i])))
            for i, c in enumerate(clients)]


def local_steps(data: ClientData, algo: Algorithm) -> int:
    """FedAvg local steps per round: E epochs of full batches, capped by ``local_steps``."""
    steps = algo.local_epochs * data.batches_per_epoch(algo.batch_size)
    return min(steps, algo.local_steps) if algo.local_steps else steps


def _fedavg_client(engine: Engine, data: ClientData, plan: RoundPlan, algo: Algorithm,
                   resume: ClientProgress | None = None, on_step: StepHook | None = None):
    w = torch.nn.Parameter(plan.weights.clone())
    opt = make_optimizer(algo.client_optimizer, w, algo.client_lr, algo.betas, algo.client_weight_decay)
    steps = local_steps(data, algo)
    step_seed = derive_seed(plan.seed, TAG_LOCAL, data.client)
    first, forwards, loss_sum = 0, 0, 0.0
    if resume is not None:
        if (resume.client, resume.round) != (data.client, plan.round) or not 0 < resume.step <= steps:
            raise ValueError(f"progress of client {resume.client} at step {resume.step} of round {resume.round + 1} "
                             f"does not continue client {data.client} in round {plan.round + 1} ({steps} steps)")
        with torch.no_grad():
            w.copy_(resume.weights)
        # Adam keeps the tensors it is given and updates them in place: copy, so that ``resume``
        # (which the caller may still hold and save) stays the state after its step
        opt.load_state_dict(copy.deepcopy(resume.optimizer))
        first, forwards, loss_sum = resume.step, resume.forward_passes, resume.loss_sum
    start = plan.round * steps  # the client's batch stream continues across rounds
    for s in range(first, steps):
        x, y = data.batch(start + s, algo.batch_size)
        if algo.method == "backprop":
            g, loss = engine.model.grad(w.detach(), x, y)
            forwards += 1
        else:
            result, passes = _probe(engine, w.detach(), [(x, y)], algo.probe_plan(step_seed, stream=s), algo,
                                    accumulate=True)
            g, loss, forwards = result.g, float(result.loss_at_w[0]), forwards + passes
        loss_sum += loss
        w.grad = g
        opt.step()
        if on_step is not None:
            on_step(lambda done=s + 1, f=forwards, ls=loss_sum: ClientProgress(
                data.client, plan.round, done, w.detach().clone(), copy.deepcopy(opt.state_dict()), f, ls))
    backwards = steps if algo.method == "backprop" else 0
    delta = (w.detach() - plan.weights).to(torch.float32)
    return Upload(data.client, plan.round, delta), ClientStats(forwards, backwards, loss_sum / steps)


# ---- server half ----------------------------------------------------------------------

def server_decode(aggregate: torch.Tensor, plan: RoundPlan, algo: Algorithm) -> torch.Tensor:
    """Pseudo-gradient for the server optimiser from the aggregated upload vector.

    FedSGD baffle: g_hat = combine(u) (Stein); FedSGD backprop: the mean gradient;
    FedAvg: minus the mean model delta.
    """
    n = plan.weights.numel()
    if algo.mode == "fedavg":
        return -aggregate
    if algo.method == "backprop":
        return aggregate
    return combine(aggregate, n, algo.probe_plan(plan.seed), algo.probe_block, plan.weights.device)


def round_seed(run_seed: int, t: int) -> int:
    return derive_seed(run_seed, TAG_ROUND, t)
