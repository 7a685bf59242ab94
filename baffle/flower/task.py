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


def plan_records(plan: RoundPlan, config: RunConfig) -> dict:
    return {
        "plan": ConfigRecord({"round": plan.round, "seed": str(plan.seed), "config": json.dumps(config.to_dict())}),
        "weights": ArrayRecord(array_dict={"w": Array(plan.weights.numpy())}),
    }


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
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed reply: {type(e).__name__}: {e}") from None
    accounting = decode_stats(content, client, examples)
    if vector.shape != (length,) or vector.dtype != np.float32:
        raise WireError(f"malformed reply: vector of shape {vector.shape} and dtype {vector.dtype} "
                        f"(expected ({length},) float32)")
    if not np.isfinite(vector).all():
        raise WireError(f"malformed reply: {int((~np.isfinite(vector)).sum())} non-finite values")
    return Upload(client, round, torch.from_numpy(vector.copy())), accounting


def decode_stats(content: RecordDict, client: int, examples: int) -> ClientStats:
    try:
        stats = content["stats"]
        got = int(stats["num-examples"])
        accounting = ClientStats(int(stats["forward-passes"]), int(stats["backward-passes"]),
                                 float(stats["train-loss"]))
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed reply: {type(e).__name__}: {e}") from None
    if got != examples:
        raise WireError(f"malformed reply: num-examples {got}, but client {client} holds {examples}")
    return accounting


def encode_identity(partition_id: int, num_partitions: int) -> RecordDict:
    return RecordDict({"node": ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions})})


def decode_identity(content: RecordDict) -> tuple[int, int]:
    try:
        node = content["node"]
        return int(node["partition-id"]), int(node["num-partitions"])
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed identity: {type(e).__name__}: {e}") from None


# ---- secure aggregation over Flower messages (baffle.aggregation.secure) -------------------
#
# Four message rounds per training round, "train.secagg_<phase>", each carrying the
# protocol's own message (public keys, ciphertexts, masked uint64 words, shares);
# the node keeps its round secrets in its Flower context state, never in a reply.
#
#   advertise  server -> node  secagg {round, num-clients, threshold, fraction-bits, clip}
#              node -> server  advert {c-pk, s-pk}
#   share      server -> node  secagg + adverts {clients, c-pks, s-pks}
#              node -> server  shares {recipients, ciphertexts}
#   masked     server -> node  secagg + plan + weights + routed {senders, ciphertexts, weight}
#              node -> server  masked ArrayRecord {y: uint64 (length,)} + stats MetricRecord
#   unmask     server -> node  secagg + request {survivors, dropped}
#              node -> server  unmask {self-mask-clients, self-mask-shares, mask-key-clients,
#                              mask-key-shares} (shares as big-endian bytes)

SECAGG_PHASES = ("secagg_advertise", "secagg_share", "secagg_masked", "secagg_unmask")


def encode_secagg(round: int, config) -> ConfigRecord:
    return ConfigRecord({"round": round, "num-clients": config.num_clients, "threshold": config.threshold,
                         "fraction-bits": config.fraction_bits, "clip": float(config.clip)})


def decode_secagg(content: RecordDict):
    """(round, SecureAggConfig) of a secure-aggregation message."""
    from ..aggregation.secure import SecureAggConfig

    rnd, n, t, f, clip = _fields(content, "secagg", "round", "num-clients", "threshold", "fraction-bits", "clip")
    try:
        return int(rnd), SecureAggConfig(num_clients=int(n), threshold=int(t), fraction_bits=int(f), clip=float(clip))
    except (TypeError, ValueError) as e:
        raise WireError(f"malformed secagg header: {e}") from None


def _fields(content: RecordDict, record: str, *names: str) -> list:
    try:
        rec = content[record]
        return [rec[n] for n in names]
    except (KeyError, TypeError) as e:
        raise WireError(f"malformed {record}: missing {e}") from None


def shares_to_bytes(values) -> list[bytes]:
    from ..aggregation import shamir

    return [int(v).to_bytes(shamir.SHARE_BYTES, "big") for v in values]


def bytes_to_shares(values) -> list[int]:
    return [int.from_bytes(v, "big") for v in values]


# node -> server: the protocol messages; the server attributes each to the node it came
# from (``client``), never to an id the reply claims.

def advert_to_record(a) -> RecordDict:
    return RecordDict({"advert": ConfigRecord({"round": a.round, "c-pk": a.c_pk, "s-pk": a.s_pk})})


def record_to_advert(content: RecordDict, client: int):
    from ..aggregation.secure import KeyAdvert

    rnd, c_pk, s_pk = _fields(content, "advert", "round", "c-pk", "s-pk")
    return KeyAdvert(client, int(rnd), bytes(c_pk), bytes(s_pk))


def shares_to_record(shares) -> RecordDict:
    return RecordDict({"shares": ConfigRecord({"round": shares[0].round if shares else -1,
                                               "recipients": [x.recipient for x in shares],
                                               "ciphertexts": [x.ciphertext for x in shares]})})


def record_to_shares(content: RecordDict, client: int):
    from ..aggregation.secure import EncryptedShare

    rnd, to, ct = _fields(content, "shares", "round", "recipients", "ciphertexts")
    if len(to) != len(ct) or not to:
        raise WireError(f"malformed shares: {len(to)} recipients, {len(ct)} ciphertexts")
    return tuple(EncryptedShare(int(rnd), client, int(v), bytes(c)) for v, c in zip(to, ct))


def masked_to_record(m, upload_stats: RecordDict) -> RecordDict:
    return RecordDict({"masked": ArrayRecord(array_dict={"y": Array(np.asarray(m.masked))}),
                       "masked-meta": ConfigRecord({"round": m.round, "weight": float(m.weight)}),
                       "stats": upload_stats["stats"]})


def record_to_masked(content: RecordDict, client: int):
    from ..aggregation.secure import MaskedInput

    rnd, weight = _fields(content, "masked-meta", "round", "weight")
    try:
        y = np.asarray(content["masked"]["y"].numpy())
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed masked input: {e}") from None
    return MaskedInput(client, int(rnd), float(weight), y)


def unmask_to_record(u) -> RecordDict:
    return RecordDict({"unmask": ConfigRecord({
        "round": u.round,
        "self-mask-clients": [v for v, _ in u.self_mask], "self-mask-shares": shares_to_bytes(s for _, s in u.self_mask),
        "mask-key-clients": [v for v, _ in u.mask_key], "mask-key-shares": shares_to_bytes(s for _, s in u.mask_key)})})


def record_to_unmask(content: RecordDict, client: int):
    from ..aggregation.secure import UnmaskShares

    rnd, sc, ss, kc, ks = _fields(content, "unmask", "round", "self-mask-clients", "self-mask-shares",
                                  "mask-key-clients", "mask-key-shares")
    if len(sc) != len(ss) or len(kc) != len(ks):
        raise WireError("malformed unmask: clients and shares differ in number")
    return UnmaskShares(client, int(rnd), tuple(zip(map(int, sc), bytes_to_shares(ss))),
                        tuple(zip(map(int, kc), bytes_to_shares(ks))))


# server -> node: what the protocol routes to each client

def adverts_record(adverts) -> ConfigRecord:
    return ConfigRecord({"clients": [a.client for a in adverts], "c-pks": [a.c_pk for a in adverts],
                         "s-pks": [a.s_pk for a in adverts]})


def adverts_from(content: RecordDict, round: int):
    from ..aggregation.secure import KeyAdvert

    cs, cp, sp = _fields(content, "adverts", "clients", "c-pks", "s-pks")
    return [KeyAdvert(int(c), round, bytes(a), bytes(b)) for c, a, b in zip(cs, cp, sp)]


def routed_record(bundle, weight: float) -> ConfigRecord:
    return ConfigRecord({"senders": [x.sender for x in bundle], "ciphertexts": [x.ciphertext for x in bundle],
                         "weight": float(weight)})


def routed_from(content: RecordDict, round: int, me: int):
    from ..aggregation.secure import EncryptedShare

    senders, cts, weight = _fields(content, "routed", "senders", "ciphertexts", "weight")
    return [EncryptedShare(round, int(u), me, bytes(c)) for u, c in zip(senders, cts)], float(weight)


def request_record(request) -> ConfigRecord:
    return ConfigRecord({"survivors": list(request.survivors), "dropped": list(request.dropped)})


def request_from(content: RecordDict, round: int):
    from ..aggregation.secure import UnmaskRequest

    surv, drop = _fields(content, "request", "survivors", "dropped")
    return UnmaskRequest(round, tuple(map(int, surv)), tuple(map(int, drop)))
