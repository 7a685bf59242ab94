"""The baffle ServerApp: the in-process server loop with its clients on Flower nodes.

The server half is :class:`baffle.simulation.Simulator` unchanged (sampling, the
weighted sum or secure sum, Stein's combine, the optimiser, the EMA, evaluation)
and the run directory is :func:`baffle.runs.execute`'s; only the clients move:
:class:`FlowerClients` sends each chosen client's node the plan and collects the
replies. A node that crashes, misses ``reply_timeout`` or sends a malformed reply
is left out of the round with the reason in metrics.jsonl (``rejected``); with
fewer than ``min_replies`` replies the round is skipped and the model kept.

Run config (``flwr run ... --run-config``, defaults in this folder's pyproject.toml):
    preset    a baffle preset name                        (default "quick")
    options   run options overriding it, space-separated name=value pairs as in
              ``baffle run`` (e.g. "dataset=synthetic rounds=3 num-perturbations=50")
    out       run directory, absolute or relative to the SuperLink's working directory
              (default runs/<preset>-flower-<time>)
    resume    true: continue the run in ``out``
"""
from __future__ import annotations

import threading
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Callable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .. import runs
from ..config import ConfigError, RunConfig, resolve
from ..modes import RoundPlan
from ..simulation import SecureRound
from .task import (WireError, adverts_record, decode_identity, decode_reply, decode_stats, encode_secagg,
                   plan_records, record_to_advert, record_to_masked, record_to_shares, record_to_unmask,
                   request_record, routed_record)

app = ServerApp()

NODE_POLL_SECONDS = 0.5
REPLY_POLL_SECONDS = 0.05  # how often the server looks for replies (Flower's HTTP grid sleeps 3 s)


class Stopped(Exception):
    """The run was asked to stop (Ctrl-C) while waiting for nodes: the round is abandoned unrecorded."""


class FlowerClients:
    """:class:`baffle.simulation.RemoteClients` over a Flower ``Grid``: client c is the
    node whose node config says ``partition-id = c``."""

    def __init__(self, grid: Grid, config: RunConfig, n: int, stop: threading.Event | None = None):
        self.grid = grid
        self.stop = stop or threading.Event()
        self.config = config
        self.length = config.algorithm().uplink_floats(n)
        self.node_of: dict[int, int] = {}  # client (partition-id) -> node id
        self.seen: set[int] = set()  # nodes identified (used or not)

    def discover(self, wait: float) -> dict[int, int]:
        """Map clients to nodes; wait up to ``wait`` s for all num_clients nodes to connect."""
        deadline = time.monotonic() + wait
        while True:
            nodes = [i for i in self.grid.get_node_ids() if i not in self.seen]
            if nodes:
                self._identify(nodes)
            if len(self.node_of) >= self.config.num_clients or time.monotonic() >= deadline:
                return self.node_of
            if self.stop.wait(NODE_POLL_SECONDS):
                raise Stopped("stopped while waiting for nodes")

    def send_and_receive(self, msgs: list[Message]) -> list[Message]:
        """Push ``msgs``; the replies that arrive within reply_timeout (raises Stopped on stop)."""
        pending = set(self.grid.push_messages(msgs))
        deadline = time.monotonic() + self.config.reply_timeout
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            if self.stop.is_set():
                raise Stopped("stopped while waiting for replies")
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {r.metadata.reply_to_message_id for r in got}
            if pending and self.stop.wait(REPLY_POLL_SECONDS):
                raise Stopped("stopped while waiting for replies")
        return replies

    def _identify(self, nodes: list[int]) -> None:
        msgs = [Message(content=RecordDict(), dst_node_id=i, message_type="query") for i in nodes]
        for reply in self.send_and_receive(msgs):
            src = reply.metadata.src_node_id
            self.seen.add(src)
            if reply.has_error():
                log(WARNING, "baffle: node %s did not identify itself: %s", src, reply.error.reason)
                continue
            try:
                pid, parts = decode_identity(reply.content)
            except WireError as e:
                log(WARNING, "baffle: node %s: %s", src, e)
                continue
            if parts != self.config.num_clients:  # a federation set up for another run: stop now
                raise ConfigError(f"node {src} has num-partitions {parts}, the run has num_clients "
                                  f"{self.config.num_clients}: give every node num-partitions="
                                  f"{self.config.num_clients} (simulation: num-supernodes = num_clients)")
            if pid in self.node_of:
                log(WARNING, "baffle: node %s repeats partition-id %s (node %s has it); not used",
                    src, pid, self.node_of[pid])
            else:
                self.node_of[pid] = src

    def work(self, chosen: list[int], plan: RoundPlan, sizes: Mapping[int, int]):
        if any(c not in self.node_of for c in chosen):
            self.discover(wait=0)  # a node may have joined since
        content = plan_records(plan, self.config)
        replies, missing = self._exchange("train", [c for c in chosen if c in self.node_of], lambda c: content)
        for c in chosen:
            if c not in self.node_of:
                yield c, f"train: no node has partition-id {c}"
            elif c in missing:
                yield c, missing[c]
            else:
                try:
                    yield c, decode_reply(replies[c], c, plan.round, self.length, sizes[c])
                except WireError as e:
                    yield c, f"train: {e}"

    def _exchange(self, phase: str, clients: list[int],
                  records: Callable[[int], dict]) -> tuple[dict[int, RecordDict], dict[int, str]]:
        """Send each client its message of ``phase`` ("train" or a "train.<phase>" action):
        the contents of the replies that came back, and why the others did not."""
        kind = "train" if phase == "train" else f"train.{phase}"
        msgs = [Message(content=RecordDict(records(c)), dst_node_id=self.node_of[c], message_type=kind)
                for c in clients]
        replies = {r.metadata.src_node_id: r for r in self.send_and_receive(msgs)}
        out, missing = {}, {}
        for c in clients:
            node = self.node_of[c]
            reply = replies.get(node)
            if reply is None:
                missing[c] = f"{phase}: no reply within {self.config.reply_timeout:g} s (node {node})"
            elif reply.has_error():
                missing[c] = f"{phase}: node {node} failed: {reply.error.reason.strip()[-300:]}"
            else:
                out[c] = reply.content
        return out, missing

    def secure_work(self, chosen: list[int], plan: RoundPlan, sizes: Mapping[int, int], config) -> SecureRound:
        """The round with baffle's secure aggregation carried over Flower messages.

        The server side is :class:`baffle.aggregation.secure.SecureAggServer`, the node
        side :class:`~baffle.aggregation.secure.SecureAggClient` (client_app.py): the
        server sees public keys, ciphertexts it cannot open, masked uint64 vectors and,
        for the unmasking, shares of survivors' self-mask seeds and of dropped clients'
        mask keys: the sum, never one client's upload. Each client's weight is
        sizes[c] / sum over the round (public); the server divides by the survivors' sum.
        """
        from ..aggregation.secure import SecureAggServer

        rejected = [f"client {c}, secagg_advertise: no node has partition-id {c}" for c in chosen
                    if c not in self.node_of]
        total = sum(sizes[c] for c in chosen)
        server = SecureAggServer(plan.round, config, chosen, self.length)
        header = {"secagg": encode_secagg(plan.round, config)}
        stats = {}

        def exchange(phase: str, clients: list[int], records: Callable[[int], dict]) -> dict[int, RecordDict]:
            replies, missing = self._exchange(phase, clients, records)
            rejected.extend(f"client {c}, {why}" for c, why in missing.items())
            return replies

        def admit(receive, decode, phase: str, replies: dict[int, RecordDict]) -> None:
            for c, content in replies.items():
                try:
                    receive(decode(content, c))
                except WireError as e:
                    rejected.append(f"client {c}, {phase}: {e}")

        members = [c for c in chosen if c in self.node_of]
        admit(server.receive_advert, record_to_advert, "secagg_advertise",
              exchange("secagg_advertise", members, lambda c: header))
        adverts = server.broadcast_adverts()
        if adverts:
            shared = {**header, "adverts": adverts_record(adverts)}
            admit(server.receive_shares, record_to_shares, "secagg_share",
                  exchange("secagg_share", [a.client for a in adverts], lambda c: shared))
        routed = server.routed_shares()
        if routed:
            round_plan = {**header, **plan_records(plan, self.config)}
            replies = exchange("secagg_masked", sorted(routed),
                               lambda c: {**round_plan, "routed": routed_record(routed[c], sizes[c] / total)})
            for c, content in replies.items():
                try:
                    accounting, msg = decode_stats(content, c, sizes[c]), record_to_masked(content, c)
                except WireError as e:
                    rejected.append(f"client {c}, secagg_masked: {e}")
                    continue
                if server.receive_masked(msg) is None:
                    stats[c] = accounting
        request = server.unmask_request()
        if request is not None:
            asked = {**header, "request": request_record(request)}
            admit(server.receive_unmask, record_to_unmask, "secagg_unmask",
                  exchange("secagg_unmask", list(request.survivors), lambda c: asked))
        return SecureRound(server.finish(), stats, tuple(rejected), self.length)


def serve(grid: Grid, config: RunConfig, out: Path, *, resume: bool = False, setup: runs.Setup | None = None,
          on_round: Callable[[dict], None] | None = None, stop: threading.Event | None = None) -> dict:
    """Run ``config`` to the end with its clients on ``grid``'s nodes; return the summary.
    Setting ``stop`` abandons the round in progress (nothing of it is written) with Stopped."""
    setup = setup or runs.build(config)
    clients = FlowerClients(grid, config, setup.simulator.n, stop)
    found = clients.discover(wait=config.reply_timeout)
    log(INFO, "baffle: %d of %d clients have a node", len(found), config.num_clients)
    setup.simulator.use_remote(clients)
    return runs.execute(config, out, resume=resume, setup=setup, on_round=on_round)


def log_round(row: dict) -> None:
    for reason in row.get("rejected", ()):
        log(WARNING, "baffle: round %d: left out %s", row["round"], reason)
    if row.get("skipped"):
        log(WARNING, "baffle: round %d skipped, model unchanged: %s", row["round"], row["skipped"])
    acc = "" if row["test_top1"] is None else f", test accuracy {100 * row['test_top1']:.2f}%"
    log(INFO, "baffle: round %d done, %d clients%s", row["round"], row["clients"], acc)


def parse_options(text: str) -> dict[str, str]:
    """ "rounds=3 num-perturbations=50" -> {"rounds": "3", "num_perturbations": "50"} (typed by RunConfig)."""
    overrides = {}
    for item in text.split():
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"run config options: expected name=value, got {item!r}")
        overrides[name.removeprefix("--").replace("-", "_")] = value
    return overrides


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config names the preset, options and directory."""
    rc = context.run_config
    overrides = parse_options(str(rc.get("options", "")))
    resume = str(rc.get("resume", "false")).lower() in ("1", "true", "yes")
    out = Path(str(rc.get("out", "") or "")) if rc.get("out") else None
    if resume:
        if out is None:
            raise ConfigError("resume = true needs out = the run directory")
        config = runs.check_resumable(out, None)
    else:
        config = resolve(str(rc.get("preset", "quick")), overrides)
        out = runs.new_run_dir(config, out)
    out = out.absolute()
    log(INFO, "baffle: %s, run directory %s", config.preset, out)
    summary = serve(grid, config, out, resume=resume, on_round=log_round)
    log(INFO, "baffle: final test accuracy %.2f%% (run directory %s)", 100 * summary["final_test_top1"], out)
