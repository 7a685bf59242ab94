"""Secure aggregation: the server learns sum_c w_c x_c over the round, never one x_c.

Protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017 (single server, semi-honest, with dropouts), which BAFFLE's
Algorithm 1 (lines 9-15) relies on. One server and one client object per round
(every key and seed is fresh per round); four phases, each one message per direction:

0. advertise  u -> S: two X25519 public keys, c_pk_u (mask agreement) and s_pk_u
              (share encryption).                     S -> all: the adverts of U1.
1. share      u draws a self-mask seed b_u (32 bytes), Shamir-shares b_u and c_sk_u
              with threshold t among U1 (:mod:`.shamir`), and encrypts v's shares with
              AES-256-GCM under HKDF-SHA256(X25519(s_sk_u, s_pk_v)); S only routes
              ciphertexts.                            S -> v: the ciphertexts from U2.
2. masked     u -> S: y_u = enc(w_u x_u) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv)
                                                    - sum_{v in U2, v < u} PRG(s_uv)
              (mod 2^64), s_uv = HKDF-SHA256(X25519(c_sk_u, c_pk_v), info = "baffle-mask"
              || round || min(u,v) || max(u,v)) = s_vu; PRG = ChaCha20 keystream read as
              little-endian uint64 words.             S -> U3: survivors U3, dropped U2 \\ U3.
3. unmask     u -> S: its shares of b_v for v in U3 and of c_sk_d for d in U2 \\ U3 (a
              client never reveals both for one client: :class:`ShareConflict`).
              With t answers S rebuilds b_v and c_sk_d, recomputes s_dv, and
                  sum_{v in U3} y_v - sum_{v in U3} PRG(b_v) + dangling pair masks
                = sum_{v in U3} enc(w_v x_v)   (mod 2^64),
              because the masks of every pair of survivors cancel.

Fixed point in Z_(2^64), f = ``fraction_bits``, C = ``clip``:
    enc(v) = rint(clip(v, -C, C) * 2^f) mod 2^64,    dec(z) = signed(z) / 2^f,
signed() reading [2^63, 2^64) as negative. Clients encode w_c x_c, so the decoded sum is
the weighted sum. No overflow by construction: :class:`SecureAggConfig` checks
num_clients * rint(C 2^f) <= 2^63 - 1, so every partial sum of up to num_clients terms
decodes to its true value. Quantisation bound, for inputs with |w_c x_c| <= C:

    |dec(sum_c enc(w_c x_c)) - sum_c w_c x_c| <= n 2^-(f+1) + n C 2^-52,

n the number of summed clients: rint errs by at most half a step per client; the second
term is float64 rounding of w_c x_c and of the decoded sum (< 1e-6 of the first for the
defaults). Values beyond the clip are clipped, so then the sum is of the clipped terms.

Security (Bonawitz et al., Thm. 6.2): the server, even colluding with fewer than t
clients, learns only the sum over U3 (and the public weights). A threshold above n/2
(:func:`default_threshold`) keeps two disjoint groups of t from existing, which a
deviating server would need to unmask one client both ways.

Faults: messages from unknown clients, for another round (replay), arriving twice, out
of phase, malformed or of the wrong length are rejected with a named reason
(:data:`REASONS`) and the protocol goes on without them; a rejected masked upload makes
its sender a dropped client whose masks are removed. Non-finite inputs are refused on
the client before encoding (:class:`NonFiniteInput`). With fewer than t clients left
at any phase the round fails: ``sum`` is None and ``reason`` says why.

Wire sizes (``nbytes``) assume a fixed-width encoding: 8-byte round numbers, ids,
counts and weights, 32-byte keys, 66-byte field elements, 8 bytes per masked word.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import shamir

__all__ = [
    "PHASES", "DROP_PHASES", "REASONS",
    "SecureAggConfig", "default_threshold", "encode", "decode",
    "KeyAdvert", "EncryptedShare", "MaskedInput", "UnmaskRequest", "UnmaskShares",
    "Rejection", "SecureSumResult",
    "SecureAggError", "NonFiniteInput", "ProtocolAbort", "ShareConflict",
    "SecureAggClient", "SecureAggServer", "secure_weighted_sum",
]

RandomBytes = Callable[[int], bytes]

PHASES = ("advertise", "share", "masked", "unmask")
# secure_weighted_sum(drop_after=...): "start" takes part in nothing, "masked" uploads
# its masked vector but never answers the unmask request.
DROP_PHASES = ("start", "advertise", "share", "masked")
REASONS = {
    "unknown_client": "sender is not a client of this round",
    "wrong_round": "message carries another round number (replay or future)",
    "duplicate": "a second message from the same client in the same phase",
    "out_of_phase": "phase closed, or sender did not complete the previous phase",
    "wrong_length": "masked vector length differs from the round's vector length",
    "malformed": "wrong dtype, key size, recipients or share set",
    "non_finite": "client refused non-finite input before encoding",
    "client_abort": "client refused to go on (ProtocolAbort)",
}

KEY_BYTES = 32
SEED_BYTES = 32
WORD_BYTES = 8
_ID_LIMIT = 2**63
_PLAINTEXT_BYTES = 16 + 2 * shamir.SHARE_BYTES
_CIPHERTEXT_BYTES = _PLAINTEXT_BYTES + 16  # AES-GCM tag
_NONCE = bytes(12)  # every share key encrypts exactly one message (round, sender, recipient)


# ---- configuration and fixed point ------------------------------------------------

def default_threshold(num_clients: int) -> int:
    """floor(n/2) + 1, at least 2: an honest majority of the round must answer."""
    return max(2, num_clients // 2 + 1)


@dataclass(frozen=True)
class SecureAggConfig:
    """Protocol parameters of a run; validated eagerly.

    num_clients: the most clients one round may have (sizes the overflow check).
    threshold: t, the Shamir threshold and the fewest clients a round can finish with.
    fraction_bits: f, the fixed-point scale 2^f (step 2^-f).
    clip: C, every encoded term w_c x_c is clipped to [-C, C].
    """

    num_clients: int
    threshold: int
    fraction_bits: int = 24
    clip: float = 64.0

    def __post_init__(self) -> None:
        n, t, f, c = self.num_clients, self.threshold, self.fraction_bits, self.clip
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"num_clients must be an int >= 2, got {n!r}")
        if not isinstance(t, int) or not 2 <= t <= n:
            raise ValueError(f"threshold must be an int in [2, num_clients={n}], got {t!r}")
        if not isinstance(f, int) or not 0 <= f <= 62:
            raise ValueError(f"fraction_bits must be an int in [0, 62], got {f!r}")
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ValueError(f"clip must be a finite number > 0, got {c!r}")
        if n * self.max_word > 2**63 - 1:
            raise ValueError(
                f"num_clients * clip * 2**fraction_bits must be < 2**63 so the sum cannot "
                f"overflow Z_2^64: got num_clients={n}, clip={c}, fraction_bits={f}, "
                f"product {n * c * 2.0**f:.4g} >= 2**63 = {2.0**63:.4g}; lower one of them")

    @property
    def max_word(self) -> int:
        """Largest |enc(v)| as an integer: rint(C 2^f)."""
        return int(np.rint(float(self.clip) * 2.0**self.fraction_bits))

    def error_bound(self, n: int) -> float:
        """Bound on |decoded sum - true weighted sum| for n clients with |w_c x_c| <= C."""
        return n * (2.0 ** -(self.fraction_bits + 1) + float(self.clip) * 2.0**-52)


def encode(values: np.ndarray, config: SecureAggConfig) -> np.ndarray:
    """enc(v) = rint(clip(v, -C, C) 2^f) mod 2^64 as uint64 (two's complement)."""
    v = np.clip(np.asarray(values, dtype=np.float64), -config.clip, config.clip)
    return np.rint(v * 2.0**config.fraction_bits).astype(np.int64).view(np.uint64)


def decode(words: np.ndarray, config: SecureAggConfig) -> np.ndarray:
    """dec(z) = signed(z) / 2^f as float64."""
    return np.asarray(words, dtype=np.uint64).view(np.int64).astype(np.float64) * 2.0**-config.fraction_bits


# ---- wire messages ----------------------------------------------------------------

@dataclass(frozen=True)
class KeyAdvert:
    """Client -> server (phase advertise), broadcast back to all: two X25519 public keys."""

    client: int
    round: int
    c_pk: bytes  # mask agreement
    s_pk: bytes  # share encryption

    @property
    def nbytes(self) -> int:
        return 16 + len(self.c_pk) + len(self.s_pk)


@dataclass(frozen=True)
class EncryptedShare:
    """Client -> server -> client (phase share): the sender's shares of b and c_sk for one
    recipient, AES-GCM encrypted; round, sender and recipient are authenticated data."""

    round: int
    sender: int
    recipient: int
    ciphertext: bytes

    @property
    def nbytes(self) -> int:
        return 24 + len(self.ciphertext)


@dataclass(frozen=True)
class MaskedInput:
    """Client -> server (phase masked): y_u in Z_(2^64)^m and the public weight w_u."""

    client: int
    round: int
    weight: float
    masked: np.ndarray  # uint64, read-only

    @property
    def nbytes(self) -> int:
        return 24 + WORD_BYTES * int(np.size(self.masked))


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> survivors (phase unmask): who is in the sum, whose masks dangle."""

    round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 24 + 8 * (len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class UnmaskShares:
    """Client -> server (phase unmask): (client, share) pairs, shares of b_v for the
    survivors v and of c_sk_d for the dropped d."""

    client: int
    round: int
    self_mask: tuple[tuple[int, int], ...]
    mask_key: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return 16 + (8 + shamir.SHARE_BYTES) * (len(self.self_mask) + len(self.mask_key))


@dataclass(frozen=True)
class Rejection:
    """A message left out of the round: who sent it, in which phase, why (a key of REASONS)."""

    client: int
    phase: str
    reason: str
    detail: str


@dataclass(frozen=True)
class SecureSumResult:
    """Outcome of one round.

    sum: float64 sum_{u in survivors} w_u x_u (clipped and quantised, see module doc), or
        None when the round failed; the caller then leaves the model unchanged.
    weight: sum of the survivors' public weights (divide by it for a weighted mean).
    reason: why it failed, or a one-line summary on success.
    survivors: the clients whose masked input was accepted (U3: in the sum when it
        succeeded); dropped: the round's other clients.
    rejected: messages left out, client-side refusals included.
    bytes_per_client: per phase, the mean uplink bytes of the clients that sent in that
        phase; "uplink" and "downlink": mean totals over the clients that took part.
    """

    round: int
    sum: np.ndarray | None
    weight: float
    reason: str
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    rejected: tuple[Rejection, ...]
    bytes_per_client: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.sum is not None


class SecureAggError(Exception):
    """Base class of the protocol's errors."""


class NonFiniteInput(SecureAggError, ValueError):
    """A client's vector or weight holds NaN or inf; it refuses to encode it."""


class ProtocolAbort(SecureAggError):
    """A client refuses to go on: too few peers, a bad ciphertext, a bad request."""


class ShareConflict(ProtocolAbort):
    """The server asked for both the self-mask share and the key share of one client."""


# ---- primitives -------------------------------------------------------------------

def _draw(random_bytes: RandomBytes, n: int) -> bytes:
    out = random_bytes(n)
    if len(out) != n:
        raise ValueError(f"random_bytes({n}) returned {len(out)} bytes")
    return bytes(out)


def _check_id(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < _ID_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
    return int(value)


def _kdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _mask_seed(sk: X25519PrivateKey, peer_pk: bytes, round: int, a: int, b: int) -> bytes:
    """s_ab = s_ba = HKDF(X25519(c_sk_a, c_pk_b), "baffle-mask" || round || min || max)."""
    lo, hi = min(a, b), max(a, b)
    shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    return _kdf(shared, b"baffle-mask" + struct.pack(">QQQ", round, lo, hi))


def _share_key(shared: bytes, round: int, sender: int, recipient: int) -> bytes:
    """One AES-256 key per (round, sender, recipient) from X25519(s_sk_u, s_pk_v):
    direction-specific, so each key encrypts exactly one message."""
    return _kdf(shared, b"baffle-share" + struct.pack(">QQQ", round, sender, recipient))


def _prg(seed: bytes, m: int) -> np.ndarray:
    """m uint64 words: the ChaCha20 keystream (key = seed, counter and nonce 0), little-endian."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(WORD_BYTES * m))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _pk_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


# ---- client -----------------------------------------------------------------------

class SecureAggClient:
    """One client's side of one round; call advertise, share_keys, masked_input, unmask."""

    def __init__(self, client: int, round: int, config: SecureAggConfig,
                 random_bytes: RandomBytes = os.urandom) -> None:
        self.client = _check_id("client", client)
        self.round = _check_id("round", round)
        self.config = config
        self._random = random_bytes
        self._c_sk_raw = _draw(random_bytes, KEY_BYTES)
        self._c_sk = X25519PrivateKey.from_private_bytes(self._c_sk_raw)
        self._s_sk_raw = _draw(random_bytes, KEY_BYTES)
        self._s_sk = X25519PrivateKey.from_private_bytes(self._s_sk_raw)
        self._advert = KeyAdvert(self.client, self.round, _pk_bytes(self._c_sk), _pk_bytes(self._s_sk))
        self._peers: dict[int, KeyAdvert] = {}
        self._s_shared: dict[int, bytes] = {}  # X25519(s_sk_u, s_pk_v): serves both directions
        self._seed = b""
        self._own_shares: tuple[int, int] = (0, 0)
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (share of b, share of c_sk)
        self._revealed: dict[int, str] = {}
        self._step = 0

    def state_bytes(self) -> bytes:
        """Everything this client holds for the round, secrets included, as bytes: for a
        client whose phases run in separate processes (a Flower node starts one per
        message). Keep it on the client's machine; it must never reach the server."""
        return json.dumps({
            "client": self.client, "round": self.round, "step": self._step,
            "c_sk": self._c_sk_raw.hex(), "s_sk": self._s_sk_raw.hex(), "seed": self._seed.hex(),
            "peers": [[a.client, a.c_pk.hex(), a.s_pk.hex()] for a in self._peers.values()],
            "own": list(self._own_shares), "held": [[v, b, k] for v, (b, k) in self._held.items()],
            "revealed": [[v, kind] for v, kind in self._revealed.items()],
        }).encode()

    @classmethod
    def from_state_bytes(cls, state: bytes, config: SecureAggConfig,
                         random_bytes: RandomBytes = os.urandom) -> "SecureAggClient":
        """The client saved by :meth:`state_bytes`, at the same step of the same round."""
        d = json.loads(state)
        keys = iter([bytes.fromhex(d["c_sk"]), bytes.fromhex(d["s_sk"])])
        self = cls(d["client"], d["round"], config, lambda n: next(keys))
        self._random = random_bytes
        self._step = int(d["step"])
        self._seed = bytes.fromhex(d["seed"])
        self._peers = {c: KeyAdvert(c, self.round, bytes.fromhex(cp), bytes.fromhex(sp)) for c, cp, sp in d["peers"]}
        self._s_shared = {v: self._s_sk.exchange(X25519PublicKey.from_public_bytes(a.s_pk))
                          for v, a in self._peers.items() if v != self.client}
        self._own_shares = tuple(d["own"])
        self._held = {v: (b, k) for v, b, k in d["held"]}
        self._revealed = {v: kind for v, kind in d["revealed"]}
        return self

    def _enter(self, step: int, name: str) -> None:
        if self._step != step:
            raise RuntimeError(f"client {self.client}: {name} called out of order")
        self._step = step + 1

    def advertise(self) -> KeyAdvert:
        self._enter(0, "advertise")
        return self._advert

    def share_keys(self, adverts: Sequence[KeyAdvert]) -> tuple[EncryptedShare, ...]:
        """Shamir-share b_u and c_sk_u among the advertised clients U1, one ciphertext each."""
        self._enter(1, "share_keys")
        t = self.config.threshold
        peers = {}
        for a in adverts:
            if a.round != self.round or a.client in peers:
                raise ProtocolAbort(f"client {self.client}: bad advert list (round {a.round}, client {a.client})")
            peers[a.client] = a
        if peers.get(self.client) != self._advert:
            raise ProtocolAbort(f"client {self.client}: own keys missing from the advert list")
        if len(peers) < t:
            raise ProtocolAbort(f"client {self.client}: {len(peers)} clients advertised keys; threshold is {t}")
        if len({a.c_pk for a in peers.values()}) != len(peers) or len({a.s_pk for a in peers.values()}) != len(peers):
            raise ProtocolAbort(f"client {self.client}: repeated public keys in the advert list")
        self._peers = peers
        self._s_shared = {v: self._s_sk.exchange(X25519PublicKey.from_public_bytes(a.s_pk))
                          for v, a in peers.items() if v != self.client}
        self._seed = _draw(self._random, SEED_BYTES)
        xs = [v + 1 for v in sorted(peers)]
        b_shares = shamir.split(int.from_bytes(self._seed, "big"), xs, t, self._random)
        k_shares = shamir.split(int.from_bytes(self._c_sk_raw, "big"), xs, t, self._random)
        u = self.client
        self._own_shares = (b_shares[u + 1], k_shares[u + 1])
        out = []
        for v in sorted(peers):
            if v == u:
                continue
            plain = (struct.pack(">QQ", u, v) + b_shares[v + 1].to_bytes(shamir.SHARE_BYTES, "big")
                     + k_shares[v + 1].to_bytes(shamir.SHARE_BYTES, "big"))
            key = _share_key(self._s_shared[v], self.round, u, v)
            aad = struct.pack(">QQQ", self.round, u, v)
            out.append(EncryptedShare(self.round, u, v, AESGCM(key).encrypt(_NONCE, plain, aad)))
        return tuple(out)

    def _open(self, s: EncryptedShare) -> tuple[int, int]:
        u, v = s.sender, self.client
        if s.round != self.round or s.recipient != v or s.sender not in self._peers or s.sender == v:
            raise ProtocolAbort(f"client {v}: share routed wrongly (round {s.round}, {s.sender} -> {s.recipient})")
        key = _share_key(self._s_shared[u], self.round, u, v)
        try:
            plain = AESGCM(key).decrypt(_NONCE, s.ciphertext, struct.pack(">QQQ", self.round, u, v))
        except InvalidTag:
            raise ProtocolAbort(f"client {v}: share from client {u} does not authenticate") from None
        if len(plain) != _PLAINTEXT_BYTES or struct.unpack(">QQ", plain[:16]) != (u, v):
            raise ProtocolAbort(f"client {v}: share from client {u} is malformed")
        n = shamir.SHARE_BYTES
        return int.from_bytes(plain[16:16 + n], "big"), int.from_bytes(plain[16 + n:], "big")

    def masked_input(self, vector: np.ndarray, weight: float,
                     shares_for_me: Sequence[EncryptedShare]) -> MaskedInput:
        """y_u = enc(w_u x_u) + PRG(b_u) +- PRG(s_uv) over U2; raises NonFiniteInput first."""
        self._enter(2, "masked_input")
        x = np.asarray(vector, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"client {self.client}: vector must be 1-D, got shape {x.shape}")
        if not math.isfinite(weight):
            raise NonFiniteInput(f"client {self.client}: weight is {weight}; refusing to encode")
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise NonFiniteInput(f"client {self.client}: {bad.size} non-finite values (first at index "
                                 f"{bad[0]}: {x[bad[0]]}); refusing to encode")
        held = {}
        for s in shares_for_me:
            if s.sender in held:
                raise ProtocolAbort(f"client {self.client}: two shares from client {s.sender}")
            held[s.sender] = self._open(s)
        held[self.client] = self._own_shares
        t = self.config.threshold
        if len(held) < t:
            raise ProtocolAbort(f"client {self.client}: {len(held)} clients shared keys; threshold is {t}")
        self._held = held
        y = encode(float(weight) * x, self.config)
        y += _prg(self._seed, y.size)  # uint64 arithmetic wraps mod 2^64
        u = self.client
        for v in held:
            if v == u:
                continue
            pair = _prg(_mask_seed(self._c_sk, self._peers[v].c_pk, self.round, u, v), y.size)
            if v > u:
                y += pair
            else:
                y -= pair
        y.setflags(write=False)
        return MaskedInput(u, self.round, float(weight), y)

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Shares of b_v for the survivors, of c_sk_d for the dropped; never both for one client."""
        if self._step < 3:
            raise RuntimeError(f"client {self.client}: unmask called before masked_input")
        u, t = self.client, self.config.threshold
        if request.round != self.round:
            raise ProtocolAbort(f"client {u}: unmask request for round {request.round}, not {self.round}")
        surv, drop = list(request.survivors), list(request.dropped)
        both = set(surv) & set(drop)
        if both:
            raise ShareConflict(f"client {u}: asked for both kinds of share of clients {sorted(both)}")
        if len(set(surv)) != len(surv) or len(set(drop)) != len(drop):
            raise ProtocolAbort(f"client {u}: repeated clients in the unmask request")
        unknown = [v for v in surv + drop if v not in self._held]
        if unknown:
            raise ProtocolAbort(f"client {u}: holds no shares of clients {unknown}")
        if u not in surv:
            raise ProtocolAbort(f"client {u}: not listed as a survivor")
        if len(surv) < t:
            raise ProtocolAbort(f"client {u}: only {len(surv)} survivors; threshold is {t}")
        kinds = {**{v: "self_mask" for v in surv}, **{d: "mask_key" for d in drop}}
        clash = [v for v, k in kinds.items() if self._revealed.get(v, k) != k]
        if clash:
            raise ShareConflict(f"client {u}: already revealed the other share of clients {clash}")
        self._revealed.update(kinds)
        return UnmaskShares(u, self.round,
                            tuple((v, self._held[v][0]) for v in surv),
                            tuple((d, self._held[d][1]) for d in drop))


# ---- server -----------------------------------------------------------------------

class SecureAggServer:
    """The server's side of one round. It only ever holds public keys, ciphertexts,
    masked uint64 vectors, public weights and shares; :meth:`finish` unmasks the sum.

    Each receive_* method returns None or the Rejection it recorded; each server ->
    client method (broadcast_adverts, routed_shares, unmask_request) closes a phase.
    """

    def __init__(self, round: int, config: SecureAggConfig, clients: Iterable[int], length: int) -> None:
        self.round = _check_id("round", round)
        self.config = config
        ids = [_check_id("client", c) for c in clients]
        if len(set(ids)) != len(ids):
            raise ValueError(f"client ids must be distinct, got {sorted(ids)}")
        if len(ids) > config.num_clients:
            raise ValueError(f"{len(ids)} clients in the round, but config.num_clients={config.num_clients}")
        if not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be an int >= 1, got {length!r}")
        self.clients = tuple(sorted(ids))
        self.length = int(length)
        self._phase = 0
        self._failure: str | None = None
        self._adverts: dict[int, KeyAdvert] = {}
        self._shares: dict[int, tuple[EncryptedShare, ...]] = {}
        self._masked: dict[int, MaskedInput] = {}
        self._request: UnmaskRequest | None = None
        self._answers: dict[int, UnmaskShares] = {}
        self._rejected: list[Rejection] = []
        self._up: dict[str, dict[int, int]] = {p: {} for p in PHASES}
        self._down: dict[int, int] = {}

    @property
    def failure(self) -> str | None:
        """Why the round cannot finish, once a phase closed with fewer than t clients."""
        return self._failure

    def _reject(self, client: int, phase: str, reason: str, detail: str) -> Rejection:
        r = Rejection(client, phase, reason, detail)
        self._rejected.append(r)
        return r

    def _admit(self, phase: str, client: int, round: int, nbytes: int, store: Mapping, allowed) -> Rejection | None:
        if client not in self.clients:
            return self._reject(client, phase, "unknown_client", f"client {client} is not in round {self.round}")
        up = self._up[phase]
        up[client] = up.get(client, 0) + nbytes
        if round != self.round:
            return self._reject(client, phase, "wrong_round",
                                f"message for round {round}, server is in round {self.round}")
        if PHASES.index(phase) != self._phase:
            return self._reject(client, phase, "out_of_phase",
                                f"{phase} message while in phase {PHASES[min(self._phase, 3)]}")
        if client in store:
            return self._reject(client, phase, "duplicate", f"second {phase} message from client {client}")
        if allowed is not None and client not in allowed:
            return self._reject(client, phase, "out_of_phase", f"client {client} did not complete the previous phase")
        return None

    def _send(self, client: int, nbytes: int) -> None:
        self._down[client] = self._down.get(client, 0) + nbytes

    def _close(self, phase: int, members: Sequence[int], what: str) -> None:
        if self._phase != phase:
            raise RuntimeError(f"cannot close phase {PHASES[phase]} while in phase {PHASES[min(self._phase, 3)]}")
        self._phase = phase + 1
        t = self.config.threshold
        if self._failure is None and len(members) < t:
            self._failure = f"only {len(members)} of {len(self.clients)} clients {what}; threshold is {t}"

    # phase 0
    def receive_advert(self, advert: KeyAdvert) -> Rejection | None:
        rej = self._admit("advertise", advert.client, advert.round, advert.nbytes, self._adverts, None)
        if rej is None and not (len(advert.c_pk) == len(advert.s_pk) == KEY_BYTES):
            rej = self._reject(advert.client, "advertise", "malformed", "public keys must be 32 bytes")
        if rej is None:
            self._adverts[advert.client] = advert
        return rej

    def broadcast_adverts(self) -> tuple[KeyAdvert, ...]:
        """Close the advertise phase; the adverts of U1, sent to every member of U1."""
        self._close(0, list(self._adverts), "advertised keys")
        if self._failure is not None:
            return ()
        out = tuple(self._adverts[c] for c in sorted(self._adverts))
        for c in self._adverts:
            self._send(c, sum(a.nbytes for a in out))
        return out

    # phase 1
    def receive_shares(self, shares: Sequence[EncryptedShare]) -> Rejection | None:
        if not shares:
            raise ValueError("empty share upload: no sender to attribute it to")
        sender, rnd = shares[0].sender, shares[0].round
        rej = self._admit("share", sender, rnd, sum(s.nbytes for s in shares), self._shares, self._adverts)
        if rej is None:
            want = sorted(c for c in self._adverts if c != sender)
            got = sorted(s.recipient for s in shares)
            if any(s.sender != sender or s.round != rnd for s in shares) or got != want:
                rej = self._reject(sender, "share", "malformed", f"shares must go once to each of {want}, got {got}")
            elif any(len(s.ciphertext) != _CIPHERTEXT_BYTES for s in shares):
                rej = self._reject(sender, "share", "malformed", f"ciphertexts must be {_CIPHERTEXT_BYTES} bytes")
        if rej is None:
            self._shares[sender] = tuple(shares)
        return rej

    def routed_shares(self) -> dict[int, tuple[EncryptedShare, ...]]:
        """Close the share phase; for each client of U2, the ciphertexts addressed to it."""
        self._close(1, list(self._shares), "shared their keys")
        if self._failure is not None:
            return {}
        out = {v: tuple(s for u in sorted(self._shares) for s in self._shares[u] if s.recipient == v)
               for v in sorted(self._shares)}
        for v, bundle in out.items():
            self._send(v, sum(s.nbytes for s in bundle))
        return out

    # phase 2
    def receive_masked(self, msg: MaskedInput) -> Rejection | None:
        rej = self._admit("masked", msg.client, msg.round, msg.nbytes, self._masked, self._shares)
        if rej is None:
            y = msg.masked
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.ndim != 1:
                rej = self._reject(msg.client, "masked", "malformed", "masked vector must be a 1-D uint64 array")
            elif y.size != self.length:
                rej = self._reject(msg.client, "masked", "wrong_length", f"{y.size} words, expected {self.length}")
            elif not math.isfinite(msg.weight):
                rej = self._reject(msg.client, "masked", "malformed", f"weight is {msg.weight}")
        if rej is None:
            y = msg.masked.copy()  # the server's own copy, immune to later edits by the sender
            y.setflags(write=False)
            self._masked[msg.client] = replace(msg, masked=y)
        return rej

    def unmask_request(self) -> UnmaskRequest | None:
        """Close the masked phase; the request sent to every survivor (None if failed)."""
        self._close(2, list(self._masked), "survived")
        if self._failure is not None:
            return None
        survivors = tuple(sorted(self._masked))
        dropped = tuple(c for c in sorted(self._shares) if c not in self._masked)
        self._request = UnmaskRequest(self.round, survivors, dropped)
        for c in survivors:
            self._send(c, self._request.nbytes)
        return self._request

    # phase 3
    def receive_unmask(self, msg: UnmaskShares) -> Rejection | None:
        rej = self._admit("unmask", msg.client, msg.round, msg.nbytes, self._answers, self._masked)
        if rej is None:
            req = self._request
            ok = ([v for v, _ in msg.self_mask] == list(req.survivors)
                  and [d for d, _ in msg.mask_key] == list(req.dropped)
                  and all(isinstance(s, int) and 0 <= s < shamir.PRIME for _, s in msg.self_mask + msg.mask_key))
            if not ok:
                rej = self._reject(msg.client, "unmask", "malformed", "shares do not match the unmask request")
        if rej is None:
            self._answers[msg.client] = msg
        return rej

    def finish(self) -> SecureSumResult:
        """Close the round: unmask the sum if at least t survivors answered."""
        if self._failure is None:
            self._close(3, list(self._answers), "answered the unmask request")
        else:
            self._phase = len(PHASES)
        if self._failure is not None:
            return self._result(None, self._failure)
        req = self._request
        t = self.config.threshold
        answers = [self._answers[c] for c in sorted(self._answers)[:t]]
        lams = shamir.lagrange_at_zero([a.client + 1 for a in answers])

        def rebuild(kind: str, i: int) -> bytes | None:
            secret = sum(lam * getattr(a, kind)[i][1] for lam, a in zip(lams, answers)) % shamir.PRIME
            return secret.to_bytes(SEED_BYTES, "big") if secret < 2 ** (8 * SEED_BYTES) else None

        total = np.zeros(self.length, dtype=np.uint64)
        for v in req.survivors:
            total += self._masked[v].masked
        for i, v in enumerate(req.survivors):
            seed = rebuild("self_mask", i)
            if seed is None:
                return self._result(None, f"inconsistent shares of client {v}'s self-mask seed")
            total -= _prg(seed, self.length)
        for i, d in enumerate(req.dropped):
            raw = rebuild("mask_key", i)
            if raw is None:
                return self._result(None, f"inconsistent shares of client {d}'s mask key")
            sk = X25519PrivateKey.from_private_bytes(raw)
            for v in req.survivors:
                pair = _prg(_mask_seed(sk, self._adverts[v].c_pk, self.round, d, v), self.length)
                if d > v:  # y_v added PRG(s_vd)
                    total -= pair
                else:
                    total += pair
        n, k = len(self.clients), len(req.survivors)
        return self._result(decode(total, self.config),
                            f"summed {k} of {n} clients; removed the masks of {len(req.dropped)} dropped")

    def _result(self, total: np.ndarray | None, reason: str) -> SecureSumResult:
        survivors = tuple(sorted(self._masked))
        per_phase = {p: float(np.mean(list(up.values()))) if up else 0.0 for p, up in self._up.items()}
        senders = set().union(*(up.keys() for up in self._up.values()))
        uplink = [sum(up.get(c, 0) for up in self._up.values()) for c in senders]
        down = [self._down.get(c, 0) for c in senders]
        kept = [sum(up.get(c, 0) for up in self._up.values()) for c in survivors]
        bytes_per_client = {**per_phase,
                            "uplink": float(np.mean(uplink)) if uplink else 0.0,
                            "downlink": float(np.mean(down)) if senders else 0.0,
                            "uplink_total": float(sum(uplink)), "downlink_total": float(sum(down)),
                            "survivor_uplink": float(np.mean(kept)) if kept else 0.0}
        return SecureSumResult(
            round=self.round, sum=total,
            weight=float(sum(self._masked[c].weight for c in survivors)),
            reason=reason, survivors=survivors,
            dropped=tuple(c for c in self.clients if c not in survivors),
            rejected=tuple(self._rejected), bytes_per_client=bytes_per_client)


# ---- in-process driver --------------------------------------------------------------

def secure_weighted_sum(vectors: Mapping[int, np.ndarray], weights: Mapping[int, float],
                        config: SecureAggConfig, round: int, *,
                        drop_after: Mapping[int, str] | None = None,
                        random_bytes: RandomBytes = os.urandom) -> SecureSumResult:
    """Run every phase in process: the secure version of sum_c weights[c] * vectors[c].

    drop_after: client -> the last phase it completes (one of DROP_PHASES); the client
    then goes silent. Clients that raise NonFiniteInput or ProtocolAbort are dropped
    too and listed in ``rejected``. The round is skipped (sum None) below the threshold.
    random_bytes feeds every key, seed and Shamir coefficient: os.urandom for real
    secrecy; a seeded generator (e.g. numpy default_rng(seed).bytes) makes a simulation
    reproducible, at the price of keys that anyone knowing the seed can recompute.
    """
    drop_after = dict(drop_after or {})
    ids = sorted(_check_id("client", c) for c in vectors)
    if sorted(weights) != ids:
        raise ValueError(f"need one weight per vector: vectors for {ids}, weights for {sorted(weights)}")
    lengths = {np.shape(vectors[c]) for c in ids}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"vectors must be 1-D of one length, got shapes {sorted(lengths)}")
    bad = {c: p for c, p in drop_after.items() if c not in vectors or p not in DROP_PHASES}
    if bad:
        raise ValueError(f"drop_after must map clients of the round to one of {DROP_PHASES}, got {bad}")
    stages = {c: DROP_PHASES.index(drop_after[c]) if c in drop_after else len(PHASES) for c in ids}
    server = SecureAggServer(round, config, ids, next(iter(lengths))[0])
    clients = {c: SecureAggClient(c, round, config, random_bytes) for c in ids}
    refused: list[Rejection] = []
    alive = {c for c in ids if stages[c] > 0}

    def step(phase: int, c: int, call):
        """Run one client call; a refusal drops the client and is recorded."""
        if c not in alive or stages[c] <= phase:
            alive.discard(c)
            return None
        try:
            return call()
        except NonFiniteInput as e:
            refused.append(Rejection(c, PHASES[phase], "non_finite", str(e)))
        except ProtocolAbort as e:
            refused.append(Rejection(c, PHASES[phase], "client_abort", str(e)))
        alive.discard(c)
        return None

    for c in ids:
        msg = step(0, c, clients[c].advertise)
        if msg is not None:
            server.receive_advert(msg)
    adverts = server.broadcast_adverts()
    for c in sorted(a.client for a in adverts):
        msg = step(1, c, lambda: clients[c].share_keys(adverts))
        if msg is not None:
            server.receive_shares(msg)
    routed = server.routed_shares()
    for c in sorted(routed):
        msg = step(2, c, lambda: clients[c].masked_input(vectors[c], weights[c], routed[c]))
        if msg is not None:
            server.receive_masked(msg)
    request = server.unmask_request()
    for c in request.survivors if request is not None else ():
        msg = step(3, c, lambda: clients[c].unmask(request))
        if msg is not None:
            server.receive_unmask(msg)
    result = server.finish()
    return replace(result, rejected=result.rejected + tuple(refused))
