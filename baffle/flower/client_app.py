"""The baffle ClientApp: a Flower node runs one client's half of a round.

Node config (``flower-supernode --node-config``; the simulation sets the first two):
    partition-id     which client of the run this node is (0 .. num-partitions - 1)
    num-partitions   must equal the run's num_clients
    threads          torch threads for this node's forward passes (default 1)
    engine           how the node evaluates forward passes: loop (default) or compiled.
                     A deployed node runs every message in a fresh process, where
                     torch.compile (a few seconds) costs more than it saves; results
                     agree to float rounding either way

On "train" the node rebuilds the run's partition from the config in the plan (the
same seeded split as the server and the in-process simulator), takes its own part,
and calls :func:`baffle.modes.client_update`: for BAFFLE, forward passes only, K
scalars back in FedSGD. The node keeps its own examples in its Flower context state
(``baffle-data``), so later rounds skip decoding the dataset. Anything that goes wrong raises, and Flower returns the
error to the server, which leaves this client out of the round and logs why.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..aggregation.secure import ProtocolAbort, SecureAggClient
from ..config import RunConfig
from ..data import ArrayDataset
from ..engine import ENGINES, Engine
from ..flatmodel import FlatModel
from ..modes import ClientData, client_update
from .task import (adverts_from, advert_to_record, decode_plan, decode_secagg, encode_identity, encode_reply,
                   masked_to_record, request_from, routed_from, shares_to_record, unmask_to_record)

app = ClientApp()

# what a worker process keeps between messages of one run: the run's data and partition,
# and the model/engine (a simulation worker serves many virtual nodes in turn)
NODE_DATA = "baffle-data"  # the node's own examples, in its context state
_CACHE: dict[str, object] = {}


def _cached(kind: str, key: str, make):
    if _CACHE.get(kind + ".key") != key:
        _CACHE[kind + ".key"], _CACHE[kind] = key, make()
    return _CACHE[kind]


def partition_of(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    try:
        pid, parts = int(cfg["partition-id"]), int(cfg["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"node config needs integer partition-id and num-partitions, got {dict(cfg)}") from None
    if not 0 <= pid < parts:
        raise ValueError(f"partition-id {pid} is not in [0, num-partitions = {parts})")
    return pid, parts


def data_key(config: RunConfig) -> str:
    """The config fields that decide the data and the model (not round-to-round bookkeeping)."""
    return json.dumps({**config.to_dict(), "threads": None, "description": None, "rounds": None}, sort_keys=True)


def client_data(config: RunConfig, pid: int, context: Context) -> ArrayDataset:
    """Client ``pid``'s examples. Derived once from the run's seeded partition, then kept
    in the node's context state: a deployed node runs each message in a fresh process
    and would otherwise decode the whole dataset every round."""
    from ..runs import client_partitions

    key = data_key(config)
    kept = context.state[NODE_DATA] if NODE_DATA in context.state else None
    if kept is not None and kept["key"].numpy().tobytes().decode() == key:
        x, y = torch.from_numpy(kept["x"].numpy().copy()), torch.from_numpy(kept["y"].numpy().copy())
        return ArrayDataset(x, y, int(kept["classes"].numpy()[0]), config.dataset)
    train, _, parts = _cached("data", key, lambda: client_partitions(config))
    data = train.subset(parts[pid])
    context.state[NODE_DATA] = ArrayRecord(array_dict={
        "key": Array(np.frombuffer(key.encode(), np.uint8)), "x": Array(data.x.numpy()), "y": Array(data.y.numpy()),
        "classes": Array(np.array([data.num_classes], np.int64))})
    return data


def client_engine(config: RunConfig, data: ArrayDataset, name: str) -> Engine:
    """The run's model (weights come with each plan) in engine ``name``, built once per process."""
    from ..runs import build_model_for

    if name not in ENGINES:
        raise ValueError(f"node config engine must be one of {', '.join(ENGINES)}, got {name!r}")
    return _cached("engine", data_key(config) + name, lambda: Engine(
        FlatModel(build_model_for(config, tuple(data.x.shape[1:]), data.num_classes)), name, config.probe_block))


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return Message(encode_identity(*partition_of(context)), reply_to=msg)


def compute(msg: Message, context: Context) -> RecordDict:
    """This node's upload for the plan in ``msg`` (forward passes only for BAFFLE)."""
    pid, parts = partition_of(context)
    config, plan = decode_plan(msg.content)
    if parts != config.num_clients:
        raise ValueError(f"this node has num-partitions {parts}, the run has num_clients {config.num_clients}")
    torch.set_num_threads(int(context.node_config.get("threads", 1)))
    data = client_data(config, pid, context)
    engine = client_engine(config, data, str(context.node_config.get("engine", "loop")))
    upload, stats = client_update(engine, ClientData(pid, data, config.seed), plan, config.algorithm())
    return encode_reply(upload, stats, len(data))


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(compute(msg, context), reply_to=msg)


# ---- secure aggregation: one handler per phase (see task.py) --------------------------------
# The round's secrets live in this node's context state between phases (a deployed node
# runs each message in a fresh process); they are drawn from os.urandom and never sent.

SECAGG_STATE = "baffle-secagg"


def _secagg_client(msg: Message, context: Context) -> tuple[int, SecureAggClient]:
    rnd, config = decode_secagg(msg.content)
    if SECAGG_STATE not in context.state:
        raise ProtocolAbort(f"round {rnd}: no secure-aggregation state on this node (advertise never ran)")
    client = SecureAggClient.from_state_bytes(context.state[SECAGG_STATE]["state"], config)
    if client.round != rnd:
        raise ProtocolAbort(f"message for round {rnd}, this node's secure-aggregation state is of round {client.round}")
    return rnd, client


def _keep(context: Context, client: SecureAggClient) -> None:
    context.state[SECAGG_STATE] = ConfigRecord({"state": client.state_bytes()})


@app.train("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    pid, _ = partition_of(context)
    rnd, config = decode_secagg(msg.content)
    client = SecureAggClient(pid, rnd, config)  # fresh keys from os.urandom
    advert = client.advertise()
    _keep(context, client)
    return Message(advert_to_record(advert), reply_to=msg)


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    rnd, client = _secagg_client(msg, context)
    shares = client.share_keys(adverts_from(msg.content, rnd))
    _keep(context, client)
    return Message(shares_to_record(shares), reply_to=msg)


@app.train("secagg_masked")
def secagg_masked(msg: Message, context: Context) -> Message:
    rnd, client = _secagg_client(msg, context)
    bundle, weight = routed_from(msg.content, rnd, client.client)
    if int(msg.content["plan"]["round"]) != rnd:
        raise ProtocolAbort(f"plan of round {msg.content['plan']['round']} in a secure round {rnd}")
    reply = compute(msg, context)
    masked = client.masked_input(reply["upload"]["vector"].numpy(), weight, bundle)
    _keep(context, client)
    return Message(masked_to_record(masked, reply), reply_to=msg)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    rnd, client = _secagg_client(msg, context)
    answer = client.unmask(request_from(msg.content, rnd))
    _keep(context, client)
    return Message(unmask_to_record(answer), reply_to=msg)
