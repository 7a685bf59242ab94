"""What the Flower ServerApp and ClientApp exchange, and what a client keeps.

One round, FedSGD or FedAvg, BAFFLE or backprop (the math is :mod:`baffle.modes`):

    server -> node   "train"  plan:    ConfigRecord {round, seed (decimal string: it is
                                       a 64-bit unsigned), config (the run's RunConfig as JSON)}
                              weights: ArrayRecord {w: float32 (n,)}
    node             upload, stats = baffle.modes.client_update(engine, its partition, plan)
    node -> server   "train"  upload:  ArrayRecord {vector: float32 (K,) for FedSGD BAFFLE,
                                       else (n,)}
                              stats:   MetricRecord {num-examples, forward-passes,
                                       backward-passes, train-loss}
    server -> node   "query"  (once, to map nodes to clients)
    node -> server   "query"  node:    ConfigRecord {partition-id, num-partitions}

A node serves client ``partition-id`` of the run and must be configured with
``num-partitions`` equal to the run's ``num_clients``. Every node derives its own
examples from the run config alone (:func:`baffle.runs.client_partitions`), so the
server never ships data. The run config travels with every plan: a node needs no
configuration but its partition.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..config import RunConfig
from ..modes import ClientStats, RoundPlan, Upload

# Flower's offline switches (../shared/DESIGN.md section 4): no runtime installs, no
# telemetry, no update check, no Ray usage stats. Set wherever baffle starts Flower.
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def offline_env() -> None:
    os.environ.update(OFFLINE_ENV)


class WireError(ValueError):
    """A message that does not carry what the protocol says; the text names what is wrong."""


def encode_plan(plan: RoundPlan, config: RunConfig) -> RecordDict:
    return RecordDict({
        "plan": ConfigRecord({"round": plan.round, "seed": str(plan.seed), "config": json.dumps(config.to_dict())}),
        "weights": ArrayRecord(array_dict={"w": Array(plan.weights.numpy())}),
    })


def decode_plan(content: RecordDict) -> tuple[RunConfig, RoundPlan]:
    try:
        meta, arrays = content["plan"], content["weights"]
        config = RunConfig.from_dict(json.loads(meta["config"]), source="the server's plan").validate()
        w = arrays["w"].numpy()
        plan = RoundPlan(int(meta["round"]), int(meta["seed"]), torch.from_numpy(np.array(w, dtype=np.float32)))
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed plan: {type(e).__name__}: {e}") from None
    return config, plan


def encode_reply(upload: Upload, stats: ClientStats, examples: int) -> RecordDict:
    return RecordDict({
        "upload": ArrayRecord(array_dict={"vector": Array(upload.vector.detach().numpy().astype(np.float32))}),
        "stats": MetricRecord({"num-examples": int(examples), "forward-passes": int(stats.forward_passes),
                               "backward-passes": int(stats.backward_passes), "train-loss": float(stats.train_loss)}),
    })


def decode_reply(content: RecordDict, client: int, round: int, length: int,
                 examples: int) -> tuple[Upload, ClientStats]:
    """The client's upload, checked against what the round expects (length, examples, finiteness)."""
    try:
        vector = np.asarray(content["upload"]["vector"].numpy())
        stats = content["stats"]
        got = int(stats["num-examples"])
        accounting = ClientStats(int(stats["forward-passes"]), int(stats["backward-passes"]),
                                 float(stats["train-loss"]))
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed reply: {type(e).__name__}: {e}") from None
    if vector.shape != (length,) or vector.dtype != np.float32:
        raise WireError(f"malformed reply: vector of shape {vector.shape} and dtype {vector.dtype} "
                        f"(expected ({length},) float32)")
    if not np.isfinite(vector).all():
        raise WireError(f"malformed reply: {int((~np.isfinite(vector)).sum())} non-finite values")
    if got != examples:
        raise WireError(f"malformed reply: num-examples {got}, but client {client} holds {examples}")
    return Upload(client, round, torch.from_numpy(vector.copy())), accounting


def encode_identity(partition_id: int, num_partitions: int) -> RecordDict:
    return RecordDict({"node": ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions})})


def decode_identity(content: RecordDict) -> tuple[int, int]:
    try:
        node = content["node"]
        return int(node["partition-id"]), int(node["num-partitions"])
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed identity: {type(e).__name__}: {e}") from None
