"""In-process federated simulation: the embedded default engine.

Clients run one after another in this process on a shared :class:`FlatModel`;
each sees only its own data, the round plan and nothing else. The round loop:

    plan     = RoundPlan(t, seed_t, W)                       server -> sampled clients
    uploads  = [client_update(engine, data_c, plan, algo)]   clients (forward only for baffle)
    v        = sum_c (N_c / N) upload_c                      aggregation
    W        = server.step(server_decode(v))                 optimiser (+ EMA)

Clients listed in ``edge_clients`` run elsewhere than in torch (for example an
:class:`baffle.edge.OnnxClient`, ONNX Runtime + NumPy): they get the same plan and
batch and return their K scalars. A client that refuses a round (bad input, see
:class:`baffle.edge.Refused`) is left out of that round's aggregate, the reason
recorded. Clients may also live in other processes or machines: ``remote`` (for
example :class:`baffle.flower.server_app.FlowerClients`) carries the same plan to
them and brings back their uploads or the reason they are missing (a crash, a
timeout, a malformed reply). A round in which fewer than ``min_replies`` chosen
clients replied leaves the model unchanged (``skipped`` says why).

Deterministic: every random choice is derived from the run seed and the round
(see :func:`baffle.perturb.derive_seed`), so a run restored from
:meth:`Simulator.state_dict` continues exactly as if it had never stopped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .aggregation import client_weights, weighted_sum
from .data import ArrayDataset, client_sampler
from .engine import Engine
from .flatmodel import FlatModel
from .aggregation.options import SecureOptions
from .edge import Refused
from .modes import (TAG_EVAL, TAG_SAMPLE, TAG_SECURE, Algorithm, ClientData, ClientProgress, ClientStats,
                    RoundPlan, StepHook, Upload, client_update, fedsgd_clients, round_seed, server_decode)
from .perturb import derive_seed
from .server import Server, ServerOptions


class EdgeClient(Protocol):
    """A client outside this process's torch (e.g. :class:`baffle.edge.OnnxClient`):
    ``probe`` returns an object with ``u`` (K,), ``loss_at_w`` and ``forward_passes``,
    or raises :class:`baffle.edge.Refused`."""

    def probe(self, weights: np.ndarray, x: np.ndarray, y: np.ndarray, plan, layout): ...


Reply = "tuple[Upload, ClientStats] | str"  # a client's upload and accounting, or why it is left out


@dataclass(frozen=True)
class SecureRound:
    """What remote clients return from a securely aggregated round: the protocol's
    result, the accounting of the clients that computed, and who was left out (why)."""

    result: object  # baffle.aggregation.secure.SecureSumResult
    stats: Mapping[int, ClientStats]
    rejected: tuple[str, ...]
    length: int  # floats per client upload


class RemoteClients(Protocol):
    """Clients outside this process.

    ``work`` runs ``plan`` on each chosen client and yields ``(client, (Upload,
    ClientStats))`` or ``(client, reason)`` for every one of them; ``secure_work``
    runs the round with secure aggregation (each client masks its own upload, the
    weights being sizes[c] / sum(sizes)) and returns a :class:`SecureRound`.
    ``sizes`` are the examples each client is expected to hold."""

    def work(self, chosen: list[int], plan: RoundPlan, sizes: Mapping[int, int]): ...

    def secure_work(self, chosen: list[int], plan: RoundPlan, sizes: Mapping[int, int], config) -> SecureRound: ...


@dataclass(frozen=True)
class RoundRecord:
    """One line of metrics.jsonl (the runner adds wall_seconds).

    Test metrics are None on rounds that were not evaluated. train_loss is the
    server-side loss of the evaluated weights on a fixed subset of the training
    set; client_loss is the mean L(W) the clients saw on their batches (simulation
    accounting, not uploaded). forward_passes counts client passes only, cumulative.
    """

    round: int
    clients: int
    test_top1: float | None
    test_top5: float | None
    test_loss: float | None
    train_loss: float | None
    client_loss: float | None  # None when no client replied
    uplink_bytes: int
    downlink_bytes: int
    forward_passes: int
    backward_passes: int
    secure_extra_bytes: int = 0  # per surviving client: secure-aggregation uplink beyond the plain upload
    skipped: str | None = None  # why the round left the model unchanged (no reply, secure sum failed)
    rejected: tuple[str, ...] = ()  # "client c, phase: reason" for clients / messages left out of the sum

    def to_dict(self) -> dict:
        return asdict(self)


class Simulator:
    """Build from Python objects: a model, the clients' datasets, a test set."""

    def __init__(
        self,
        model: nn.Module,
        clients: Sequence[ArrayDataset],
        test: ArrayDataset,
        algorithm: Algorithm,
        server: ServerOptions = ServerOptions(),
        *,
        client_fraction: float = 1.0,
        seed: int = 0,
        train_eval_size: int = 2000,
        clients_per_forward: int = 16,
        engine: str = "loop",
        secure: SecureOptions | None = None,
        edge_clients: Mapping[int, EdgeClient] | None = None,
        remote: RemoteClients | None = None,
        min_replies: int = 1,
    ):
        if not clients:
            raise ValueError("need at least one client")
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        if remote is not None and edge_clients:
            raise ValueError("edge clients run in this process; with remote clients give them to the remote side")
        self.remote = remote
        self.min_replies = min_replies
        self.edge_clients = dict(edge_clients or {})
        bad = [c for c in self.edge_clients if not 0 <= c < len(clients)]
        if bad:
            raise ValueError(f"edge client id {bad[0]} is not a client (0..{len(clients) - 1})")
        if self.edge_clients and (algorithm.mode, algorithm.method) != ("fedsgd", "baffle"):
            raise ValueError(f"edge clients run mode fedsgd with method baffle, got {algorithm.mode}/{algorithm.method}")
        self.model = FlatModel(model)
        self.engine = Engine(self.model, engine, algorithm.probe_block)
        self.secure = secure
        self.algorithm = algorithm
        self.clients = [ClientData(i, d, seed) for i, d in enumerate(clients)]
        self.test = test
        self.seed = seed
        self.client_fraction = client_fraction
        if clients_per_forward < 1:
            raise ValueError(f"clients_per_forward must be >= 1, got {clients_per_forward}")
        self.clients_per_forward = clients_per_forward
        client_sampler(len(clients), client_fraction, np.random.default_rng(0))  # validates the fraction
        self.server = Server(self.model.weights(), server)
        self.round = 0
        self.forward_passes = 0
        self.backward_passes = 0
        self.train_eval = _fixed_subset(clients, train_eval_size, derive_seed(seed, TAG_EVAL))

    @property
    def n(self) -> int:
        return self.model.n

    def use_remote(self, remote: RemoteClients) -> None:
        """From now on the clients run elsewhere (e.g. on Flower nodes): ``remote`` reaches them."""
        if self.edge_clients:
            raise ValueError("edge clients run in this process; with remote clients give them to the remote side")
        self.remote = remote

    def sampled_clients(self, t: int) -> list[int]:
        rng = np.random.default_rng(derive_seed(self.seed, TAG_SAMPLE, t))
        return client_sampler(len(self.clients), self.client_fraction, rng).tolist()

    def step(self, evaluate: bool = True, done: Mapping[int, object] | None = None,
             on_replies: Callable[[dict[int, object]], None] | None = None,
             progress: ClientProgress | None = None, on_step: StepHook | None = None) -> RoundRecord:
        """Run the next round; evaluate the (EMA) weights if asked.

        ``on_replies({client: reply})`` is called after each batch of clients computed
        together (one client, or ``clients_per_forward`` FedSGD BAFFLE clients sharing
        their forwards; the secure-remote path, whose clients mask their own uploads,
        reports none). ``done`` holds the replies so reported before this round was
        interrupted: those clients are not run again. A client's reply depends only on
        the round's plan and its own data, and whole batches are skipped, so the others
        are grouped as they would have been and the round ends as it would have
        uninterrupted. FedAvg torch clients also report each local step: ``on_step(snapshot)``
        (see :func:`client_update`), and ``progress``, such a snapshot of a client this round
        that had not replied, continues that client from where it stopped.
        """
        t = self.round
        plan = RoundPlan(t, round_seed(self.seed, t), self.server.weights.clone())
        chosen = self.sampled_clients(t)
        downlink = len(chosen) * plan.nbytes
        need = self.secure.config(len(chosen)).threshold if self.secure is not None else 1
        if self.secure is not None and self.remote is not None:  # the clients mask their own uploads
            secure = self.secure.config(len(chosen))
            sizes = {c: len(self.clients[c]) for c in chosen}
            outcome = self.remote.secure_work(chosen, plan, sizes, secure)
            losses = self._count([outcome.stats[c] for c in sorted(outcome.stats)])
            extra, uplink, down, rejected, skipped = self._secure_outcome(outcome.result, 4 * outcome.length)
            rejected = outcome.rejected + rejected
            downlink += down
            if skipped is None and len(outcome.result.survivors) < self.min_replies:
                skipped = (f"{len(outcome.result.survivors)} of {len(chosen)} clients replied, fewer than "
                           f"min_replies {self.min_replies}")
            if skipped is None:
                self._step_secure(outcome.result, plan)
            return self._finish_round(evaluate, chosen, losses, uplink, downlink, extra, skipped, rejected)
        replies = dict(done or {})
        for batch in self._client_work([c for c in chosen if c not in replies], plan, progress, on_step):
            replies.update(batch)
            if on_replies is not None:
                on_replies(batch)
        rejected = tuple(f"client {c}, {replies[c]}" for c in chosen if isinstance(replies[c], str))
        ok = [c for c in chosen if not isinstance(replies[c], str)]
        uploads = [replies[c][0].vector for c in ok]
        uplink = sum(replies[c][0].nbytes for c in ok)
        losses = self._count([replies[c][1] for c in ok])
        extra, skipped = 0, None
        weights = client_weights([len(self.clients[c]) for c in ok]) if ok else None
        if not ok:
            skipped = f"no client replied ({len(chosen)} left out)"
        elif len(ok) < self.min_replies:
            skipped = f"{len(ok)} of {len(chosen)} clients replied, fewer than min_replies {self.min_replies}"
        elif len(ok) < max(2, need) and self.secure is not None:
            # the threshold belongs to the round's chosen clients: refusals must not lower it
            skipped = (f"{len(ok)} of {len(chosen)} clients replied, fewer than the secure-aggregation "
                       f"threshold {max(2, need)}")
        elif self.secure is None:
            self.server.step(server_decode(weighted_sum(uploads, weights), plan, self.algorithm))
        else:
            secure = dataclasses.replace(self.secure, threshold=need)
            result = secure.aggregate(ok, uploads, weights, t, derive_seed(self.seed, TAG_SECURE, t))
            extra, uplink, down, more, skipped = self._secure_outcome(result, uplink // len(ok))
            downlink += down
            rejected += more
            if skipped is None:
                self._step_secure(result, plan)
        return self._finish_round(evaluate, chosen, losses, uplink, downlink, extra, skipped, rejected)

    def _count(self, stats: list[ClientStats]) -> list[float]:
        """Add the clients' passes to the run's totals; their losses on their batches."""
        for s in stats:
            self.forward_passes += s.forward_passes
            self.backward_passes += s.backward_passes
        return [s.train_loss for s in stats]

    @staticmethod
    def _secure_outcome(result, plain: int):
        """(extra, uplink, downlink added, rejected, skipped) of a secure round whose plain
        upload is ``plain`` bytes: protocol messages replace the plain upload; every
        sender's bytes count, dropped clients' included."""
        extra = int(round(result.bytes_per_client["survivor_uplink"])) - plain
        uplink = int(round(result.bytes_per_client["uplink_total"]))
        downlink = int(round(result.bytes_per_client["downlink_total"]))
        rejected = tuple(f"client {r.client}, {r.phase}: {r.reason}" for r in result.rejected)
        return extra, uplink, downlink, rejected, None if result.ok else result.reason

    def _step_secure(self, result, plan: RoundPlan) -> None:
        """Step on the weighted mean over the clients that survived."""
        aggregate = torch.from_numpy(result.sum / result.weight).to(torch.float32)
        self.server.step(server_decode(aggregate, plan, self.algorithm))

    def _finish_round(self, evaluate, chosen, losses, uplink, downlink, extra, skipped, rejected) -> RoundRecord:
        self.round += 1
        ev = tr = None
        if evaluate:
            w = self.server.eval_weights()
            ev = self.model.evaluate(w, self.test.x, self.test.y)
            tr = self.model.evaluate(w, self.train_eval.x, self.train_eval.y).loss
        return RoundRecord(
            round=self.round,
            clients=len(chosen),
            test_top1=ev.top1 if ev else None,
            test_top5=ev.top5 if ev else None,
            test_loss=ev.loss if ev else None,
            train_loss=tr,
            client_loss=float(np.mean(losses)) if losses else None,
            uplink_bytes=uplink,
            downlink_bytes=downlink,
            forward_passes=self.forward_passes,
            backward_passes=self.backward_passes,
            secure_extra_bytes=extra,
            skipped=skipped,
            rejected=rejected,
        )

    def _client_work(self, chosen: list[int], plan: RoundPlan, progress: ClientProgress | None = None,
                     on_step: StepHook | None = None):
        """Batches {client: (Upload, ClientStats) or the reason it refused} covering the
        chosen clients, one batch per piece of work done together.

        FedSGD baffle torch clients are evaluated ``clients_per_forward`` at a time
        (same results, bigger forwards); edge clients each run on their own; remote
        clients' replies come back together.
        """
        algo, group = self.algorithm, self.clients_per_forward
        if self.remote is not None:
            yield dict(self.remote.work(chosen, plan, {c: len(self.clients[c]) for c in chosen}))
            return
        for c in chosen:
            if c in self.edge_clients:
                yield {c: self._edge_update(self.edge_clients[c], self.clients[c], plan)}
        local = [c for c in chosen if c not in self.edge_clients]
        if algo.mode == "fedsgd" and algo.method == "baffle" and group > 1:
            for i in range(0, len(local), group):
                part = local[i : i + group]
                yield dict(zip(part, fedsgd_clients(self.engine, [self.clients[c] for c in part], plan, algo)))
        else:
            for c in local:
                resume = progress if progress is not None and progress.client == c else None
                yield {c: client_update(self.engine, self.clients[c], plan, algo, resume, on_step)}

    def _edge_update(self, client: EdgeClient, data: ClientData, plan: RoundPlan):
        x, y = data.batch(plan.round, self.algorithm.batch_size)
        weights = plan.weights.numpy().view()
        weights.flags.writeable = False  # the torch clients probe the same tensor afterwards
        probe = self.algorithm.probe_plan(plan.seed)
        try:
            reply = client.probe(weights, x.numpy(), y.numpy(), probe, self.model.layout)
        except Refused as e:
            return f"probe: refused: {e}"
        u = np.asarray(reply.u)
        if u.shape != (probe.num_perturbations,) or not np.isfinite(u).all():
            return (f"probe: refused: malformed reply: u of shape {u.shape} (expected ({probe.num_perturbations},)), "
                    f"finite: {np.isfinite(u).all()}")
        upload = Upload(data.client, plan.round, torch.from_numpy(u.astype(np.float32)))
        return upload, ClientStats(int(reply.forward_passes), 0, float(reply.loss_at_w))

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "server": self.server.state_dict(),
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        self.round = int(state["round"])
        self.forward_passes = int(state["forward_passes"])
        self.backward_passes = int(state["backward_passes"])


def _fixed_subset(clients: Sequence[ArrayDataset], size: int, seed: int) -> ArrayDataset:
    """A seeded subset of the union of the clients' data, for the train-loss metric."""
    x = torch.cat([c.x for c in clients])
    y = torch.cat([c.y for c in clients])
    idx = np.random.default_rng(seed).permutation(len(y))[: max(1, size)]
    t = torch.from_numpy(np.sort(idx))
    return ArrayDataset(x[t], y[t], clients[0].num_classes, clients[0].name)
