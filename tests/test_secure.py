"""Secure aggregation (Bonawitz et al. 2017): exactness, masking, dropouts, faults.

Every test is seeded: randomness reaches the protocol only through ``random_bytes``.
Exactness tests compare against the plain fixed-point sum bit for bit and against the
float weighted sum within SecureAggConfig.error_bound (n 2^-(f+1) + n C 2^-52).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from baffle.aggregation import shamir
from baffle.aggregation.secure import (
    EncryptedShare, KeyAdvert, MaskedInput, NonFiniteInput, ProtocolAbort, SecureAggClient,
    SecureAggConfig, SecureAggServer, ShareConflict, UnmaskRequest, decode,
    default_threshold, encode, secure_weighted_sum,
)


def rb(seed: int):
    return np.random.default_rng(seed).bytes


def problem(seed: int, n: int, m: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 100, size=n)
    weights = {c: float(s / sizes.sum()) for c, s in enumerate(sizes)}
    vectors = {c: (scale * rng.standard_normal(m)).astype(np.float32) for c in range(n)}
    return vectors, weights


def plain(vectors, weights, ids=None):
    ids = sorted(vectors) if ids is None else ids
    return sum(weights[c] * vectors[c].astype(np.float64) for c in ids)


def fixed_point_sum(vectors, weights, config, ids):
    """The exact answer: dec(sum enc(w_c x_c)) with no masks at all."""
    total = np.zeros(len(vectors[ids[0]]), dtype=np.uint64)
    for c in ids:
        total += encode(weights[c] * vectors[c].astype(np.float64), config)
    return decode(total, config)


def run_manual(vectors, weights, config, round, random_bytes, *, tamper_masked=None, extra_masked=()):
    """Every phase by hand through the public client/server API.

    tamper_masked(msg) -> the messages actually delivered in place of ``msg``;
    extra_masked: messages delivered first in the masked phase (replays, strangers).
    Returns (server, clients, result, masked messages as sent).
    """
    ids = sorted(vectors)
    server = SecureAggServer(round, config, ids, len(vectors[ids[0]]))
    clients = {c: SecureAggClient(c, round, config, random_bytes) for c in ids}
    for c in ids:
        assert server.receive_advert(clients[c].advertise()) is None
    adverts = server.broadcast_adverts()
    for c in ids:
        assert server.receive_shares(clients[c].share_keys(adverts)) is None
    routed = server.routed_shares()
    for msg in extra_masked:
        server.receive_masked(msg)
    sent = {}
    for c in ids:
        try:
            msg = clients[c].masked_input(vectors[c], weights[c], routed[c])
        except NonFiniteInput:
            continue
        sent[c] = msg
        for m in (tamper_masked(msg) if tamper_masked else [msg]):
            server.receive_masked(m)
    request = server.unmask_request()
    for c in request.survivors:
        assert server.receive_unmask(clients[c].unmask(request)) is None
    return server, clients, server.finish(), sent


# ---- configuration and encoding ----------------------------------------------------

def test_config_rejects_overflow_naming_the_values():
    with pytest.raises(ValueError, match=r"num_clients=1000, clip=1000000.0, fraction_bits=40"):
        SecureAggConfig(num_clients=1000, threshold=2, fraction_bits=40, clip=1e6)
    # just inside the bound: 2 * 2^30 * 2^31 = 2^62 words
    SecureAggConfig(num_clients=2, threshold=2, fraction_bits=31, clip=2.0**30)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clients=1, threshold=2), "num_clients"),
    (dict(num_clients=5, threshold=1), "threshold"),
    (dict(num_clients=5, threshold=6), "threshold"),
    (dict(num_clients=5, threshold=3, fraction_bits=-1), "fraction_bits"),
    (dict(num_clients=5, threshold=3, clip=float("inf")), "clip"),
    (dict(num_clients=5, threshold=3, clip=0.0), "clip"),
])
def test_config_validates_eagerly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SecureAggConfig(**kwargs)


def test_default_threshold_is_a_majority():
    assert [default_threshold(n) for n in (2, 3, 4, 10, 11)] == [2, 2, 3, 6, 6]


def test_encode_decode_step_and_clip():
    """Round trip within half a step (2^-(f+1)); values beyond +-C come back as +-C."""
    cfg = SecureAggConfig(num_clients=4, threshold=2, fraction_bits=16, clip=8.0)
    x = np.random.default_rng(0).uniform(-8, 8, 1000)
    assert np.max(np.abs(decode(encode(x, cfg), cfg) - x)) <= 2.0**-17
    np.testing.assert_array_equal(decode(encode(np.array([-1e9, 9.0, 8.0, -8.0]), cfg), cfg), [-8, 8, 8, -8])


def test_shamir_any_t_shares_recover_the_secret():
    rng = np.random.default_rng(1)
    secret = int.from_bytes(rng.bytes(32), "big")
    xs = list(range(1, 8))
    shares = shamir.split(secret, xs, 4, rng.bytes)
    for pick in ([1, 2, 3, 4], [7, 5, 3, 1], [2, 4, 6, 7], xs):
        assert shamir.combine({x: shares[x] for x in pick}) == secret
    assert shamir.combine({x: shares[x] for x in [1, 2, 3]}) != secret  # t - 1 is not enough
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(secret, xs, 8, rng.bytes)


# ---- exactness ---------------------------------------------------------------------

def test_unmasked_sum_equals_weighted_sum_property():
    """Random sizes, client counts 2..12, weights, precisions and clips; inputs include
    values at 0.999999 of the clip. Tolerance: bit-exact against the unmasked fixed-point
    sum, and config.error_bound(n) against the float64 weighted sum (plus n C 2^-53 for
    the reference sum's own float64 rounding)."""
    rng = np.random.default_rng(2024)
    for trial in range(24):
        n = int(rng.integers(2, 13))
        m = int(rng.integers(1, 300))
        f = int(rng.choice([8, 16, 24, 32]))
        clip = float(rng.choice([1.0, 8.0, 64.0]))
        cfg = SecureAggConfig(num_clients=n, threshold=int(rng.integers(2, n + 1)), fraction_bits=f, clip=clip)
        vectors, weights = problem(int(rng.integers(1 << 30)), n, m, scale=clip / 4)
        c = int(rng.integers(n))  # one client's terms sit right at the clip
        signs = np.where(rng.random(m) < 0.5, -1.0, 1.0)
        vectors[c] = (signs * clip * 0.999999 / weights[c]).astype(np.float32)
        vectors = {k: np.clip(v, -clip / weights[k], clip / weights[k]) * 0.999999 for k, v in vectors.items()}
        res = secure_weighted_sum(vectors, weights, cfg, round=trial, random_bytes=rb(trial))
        assert res.ok, res.reason
        assert res.survivors == tuple(range(n)) and res.rejected == ()
        np.testing.assert_array_equal(res.sum, fixed_point_sum(vectors, weights, cfg, list(range(n))))
        err = np.max(np.abs(res.sum - plain(vectors, weights)))
        assert err <= cfg.error_bound(n) + n * clip * 2.0**-53, (trial, err, cfg)
        assert res.weight == pytest.approx(1.0)


def test_clipped_terms_sum_to_the_clipped_sum():
    cfg = SecureAggConfig(num_clients=3, threshold=2, fraction_bits=24, clip=1.0)
    vectors = {0: np.array([5.0, -5.0, 0.5]), 1: np.array([5.0, 0.25, -0.5]), 2: np.array([-3.0, 0.0, 0.0])}
    weights = {0: 0.5, 1: 0.25, 2: 0.25}
    res = secure_weighted_sum(vectors, weights, cfg, round=0, random_bytes=rb(3))
    # clipped terms: [1, -1, .25] + [1, .0625, -.125] + [-.75, 0, 0]; all exact in 2^-24 steps
    np.testing.assert_array_equal(res.sum, [1.25, -0.9375, 0.125])


def test_deterministic_given_random_bytes_and_fresh_per_round():
    cfg = SecureAggConfig(num_clients=4, threshold=3)
    vectors, weights = problem(5, 4, 50)
    _, _, r1, sent1 = run_manual(vectors, weights, cfg, 7, rb(11))
    _, _, r2, sent2 = run_manual(vectors, weights, cfg, 7, rb(11))
    _, _, r3, sent3 = run_manual(vectors, weights, cfg, 8, rb(11))  # same keys, next round
    np.testing.assert_array_equal(r1.sum, r2.sum)
    np.testing.assert_array_equal(r1.sum, r3.sum)
    for c in sent1:
        np.testing.assert_array_equal(sent1[c].masked, sent2[c].masked)
        assert np.mean(sent1[c].masked == sent3[c].masked) < 0.01  # round enters every mask seed


# ---- privacy -----------------------------------------------------------------------

def test_one_masked_vector_is_uniform_in_the_ring():
    """Statistical, seeded. The inputs are constant (all 1.0, so enc(w x) is one repeated
    word); the masked upload's top and bottom bytes over 20,000 words are each tested with
    a chi-square against uniform over 256 bins: df = 255, reject above 347.7 (the upper
    1e-4 quantile, Wilson-Hilferty), so a uniform vector passes both with p > 1 - 2e-4."""
    cfg = SecureAggConfig(num_clients=3, threshold=2)
    m = 20_000
    vectors = {c: np.ones(m, dtype=np.float32) for c in range(3)}
    weights = {c: 1 / 3 for c in range(3)}
    _, _, res, sent = run_manual(vectors, weights, cfg, 0, rb(42))
    assert res.ok
    expected = m / 256
    for shift in (56, 0):
        byte = (sent[1].masked >> np.uint64(shift)) & np.uint64(0xFF)
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < 347.7, (shift, chi2)


def _everything_held(obj, seen=None):
    """Every array, bytes and int reachable from obj's attributes, recursively."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (bytes, int, float, str, type(None))):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _everything_held(k, seen)
            yield from _everything_held(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _everything_held(v, seen)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _everything_held(getattr(obj, f.name), seen)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _everything_held(v, seen)


def test_server_never_holds_an_unmasked_vector():
    """Inspect every object the server holds after a round with one dropout: only
    KeyAdverts, EncryptedShares, MaskedInputs, UnmaskShares and bookkeeping; no array
    equals any client's encoding enc(w x) or its self-masked form, and the only arrays
    are the received masked uploads."""
    cfg = SecureAggConfig(num_clients=5, threshold=3)
    vectors, weights = problem(9, 5, 64)
    vectors[4][:] = np.nan  # client 4 refuses to encode: its masks dangle and are removed
    server, clients, res, sent = run_manual(vectors, weights, cfg, 3, rb(9))
    assert res.ok and res.survivors == (0, 1, 2, 3)
    held = list(_everything_held(server))
    arrays = [a for a in held if isinstance(a, np.ndarray)]
    assert len(arrays) == 4 and all(a.dtype == np.uint64 for a in arrays)
    for c in range(4):
        enc = encode(weights[c] * vectors[c].astype(np.float64), cfg)
        for a in arrays:
            assert not np.array_equal(a, enc)
            assert np.mean(a == enc) < 0.01
    kinds = {type(v).__name__ for v in vars(server).values()}
    assert "ndarray" not in kinds
    raw_secrets = [clients[c]._seed for c in clients] + [clients[c]._c_sk_raw for c in range(4)]
    assert not any(isinstance(b, bytes) and b in raw_secrets for b in held)


# ---- dropouts ----------------------------------------------------------------------

@pytest.mark.parametrize("dropped", [[3], [1, 5, 8], [0, 2, 7, 9]], ids=["10%", "30%", "at-threshold"])
def test_dropout_recovery_after_share_phase(dropped):
    """10 clients, t = 6; dropping 4 leaves exactly t. Tolerance: bit-exact against the
    unmasked fixed-point sum over the survivors."""
    cfg = SecureAggConfig(num_clients=10, threshold=6)
    vectors, weights = problem(17, 10, 40)
    res = secure_weighted_sum(vectors, weights, cfg, round=1, drop_after={d: "share" for d in dropped},
                              random_bytes=rb(len(dropped)))
    survivors = [c for c in range(10) if c not in dropped]
    assert res.ok, res.reason
    assert res.survivors == tuple(survivors) and res.dropped == tuple(dropped)
    np.testing.assert_array_equal(res.sum, fixed_point_sum(vectors, weights, cfg, survivors))
    assert res.weight == pytest.approx(sum(weights[c] for c in survivors))


def test_dropouts_at_every_phase():
    """Dropping before advertising, after advertising, after sharing (masks recovered)
    and after uploading (input kept, no unmask answer). Bit-exact over the uploaders."""
    cfg = SecureAggConfig(num_clients=10, threshold=5)
    vectors, weights = problem(23, 10, 30)
    drops = {0: "start", 4: "advertise", 6: "share", 9: "masked"}
    res = secure_weighted_sum(vectors, weights, cfg, round=2, drop_after=drops, random_bytes=rb(23))
    in_sum = [c for c in range(10) if c not in (0, 4, 6)]
    assert res.ok and res.survivors == tuple(in_sum)
    np.testing.assert_array_equal(res.sum, fixed_point_sum(vectors, weights, cfg, in_sum))


@pytest.mark.parametrize("phase, words", [
    ("share", "only 5 of 10 clients survived; threshold is 6"),
    ("advertise", "only 5 of 10 clients shared their keys; threshold is 6"),
    ("start", "only 5 of 10 clients advertised keys; threshold is 6"),
    ("masked", "only 5 of 10 clients answered the unmask request; threshold is 6"),
])
def test_below_threshold_round_is_skipped(phase, words):
    cfg = SecureAggConfig(num_clients=10, threshold=6)
    vectors, weights = problem(29, 10, 20)
    res = secure_weighted_sum(vectors, weights, cfg, round=4, drop_after={c: phase for c in range(5)},
                              random_bytes=rb(29))
    assert res.sum is None and not res.ok
    assert res.reason == words


def test_client_refuses_to_reveal_both_shares_of_one_client():
    cfg = SecureAggConfig(num_clients=4, threshold=2)
    vectors, weights = problem(31, 4, 8)
    _, clients, res, _ = run_manual(vectors, weights, cfg, 0, rb(31))
    c = clients[0]  # already answered survivors (0, 1, 2, 3) with self-mask shares
    with pytest.raises(ShareConflict, match=r"\[2\]"):
        c.unmask(UnmaskRequest(0, (0, 1, 3), (2,)))
    with pytest.raises(ShareConflict):
        c.unmask(UnmaskRequest(0, (0, 1, 2), (2,)))
    with pytest.raises(ProtocolAbort, match="threshold"):
        clients[1].unmask(UnmaskRequest(0, (1,), ()))
    with pytest.raises(ProtocolAbort, match="round"):
        clients[1].unmask(UnmaskRequest(5, (0, 1, 2, 3), ()))


def test_a_client_saved_and_restored_between_phases_gives_the_same_sum_and_remembers_what_it_revealed():
    """A Flower node runs each phase in a fresh process: state_bytes/from_state_bytes carry the round."""
    cfg = SecureAggConfig(num_clients=4, threshold=3)
    vectors, weights = problem(37, 4, 16)
    ids = sorted(vectors)
    server = SecureAggServer(0, cfg, ids, 16)
    saved = {}

    def phase(c, call):
        client = SecureAggClient.from_state_bytes(saved[c], cfg)
        out = call(client)
        saved[c] = client.state_bytes()
        return out

    for c in ids:
        client = SecureAggClient(c, 0, cfg, rb(100 + c))
        assert server.receive_advert(client.advertise()) is None
        saved[c] = client.state_bytes()
    adverts = server.broadcast_adverts()
    for c in ids:
        assert server.receive_shares(phase(c, lambda k: k.share_keys(adverts))) is None
    routed = server.routed_shares()
    for c in ids[:3]:  # client 3 drops after sharing its keys
        assert server.receive_masked(phase(c, lambda k: k.masked_input(vectors[c], weights[c], routed[c]))) is None
    request = server.unmask_request()
    for c in request.survivors:
        assert server.receive_unmask(phase(c, lambda k: k.unmask(request))) is None
    res = server.finish()
    assert res.ok and res.survivors == (0, 1, 2)
    np.testing.assert_array_equal(res.sum, fixed_point_sum(vectors, weights, cfg, [0, 1, 2]))
    with pytest.raises(ShareConflict):  # restored, it still refuses the other share of client 3
        phase(0, lambda k: k.unmask(UnmaskRequest(0, (0, 1, 3), (2,))))
    with pytest.raises(RuntimeError, match="out of order"):
        phase(1, lambda k: k.share_keys(adverts))


# ---- bad input ---------------------------------------------------------------------

def test_rejections_are_named_and_the_sum_goes_on():
    """Wrong length, unknown client, replay from round 4, duplicate: each rejected with
    its reason; the wrongly sized upload's sender counts as dropped. Bit-exact over the
    rest."""
    cfg = SecureAggConfig(num_clients=6, threshold=3)
    vectors, weights = problem(37, 6, 25)
    _, _, _, old = run_manual(vectors, weights, cfg, 4, rb(370))
    stranger = MaskedInput(99, 5, 0.1, np.zeros(25, dtype=np.uint64))

    def tamper(msg):
        if msg.client == 2:
            return [MaskedInput(2, 5, msg.weight, msg.masked[:-1])]
        if msg.client == 3:
            return [msg, msg]
        return [msg]

    server, _, res, _ = run_manual(vectors, weights, cfg, 5, rb(37), tamper_masked=tamper,
                                   extra_masked=[old[1], stranger])
    reasons = {(r.client, r.reason) for r in res.rejected}
    assert reasons == {(1, "wrong_round"), (99, "unknown_client"), (2, "wrong_length"), (3, "duplicate")}
    assert all(r.phase == "masked" for r in res.rejected)
    in_sum = [0, 1, 3, 4, 5]
    assert res.ok and res.survivors == tuple(in_sum) and res.dropped == (2,)
    np.testing.assert_array_equal(res.sum, fixed_point_sum(vectors, weights, cfg, in_sum))


def test_non_finite_input_is_refused_on_the_client():
    cfg = SecureAggConfig(num_clients=5, threshold=3)
    vectors, weights = problem(41, 5, 12)
    vectors[2][7] = np.inf
    res = secure_weighted_sum(vectors, weights, cfg, round=0, random_bytes=rb(41))
    assert [(r.client, r.phase, r.reason) for r in res.rejected] == [(2, "masked", "non_finite")]
    assert "index 7" in res.rejected[0].detail
    assert res.ok and res.survivors == (0, 1, 3, 4)
    np.testing.assert_array_equal(res.sum, fixed_point_sum(vectors, weights, cfg, [0, 1, 3, 4]))


def test_other_phase_faults_are_rejected():
    cfg = SecureAggConfig(num_clients=4, threshold=2)
    server = SecureAggServer(0, cfg, [0, 1, 2], length=4)
    clients = {c: SecureAggClient(c, 0, cfg, rb(c)) for c in range(3)}
    ads = {c: clients[c].advertise() for c in range(3)}
    assert server.receive_advert(ads[0]) is None
    assert server.receive_advert(ads[0]).reason == "duplicate"
    assert server.receive_advert(dataclasses.replace(ads[1], c_pk=b"short")).reason == "malformed"
    assert server.receive_advert(dataclasses.replace(ads[1], round=1)).reason == "wrong_round"
    assert server.receive_advert(ads[1]) is None
    assert server.receive_advert(ads[2]) is None
    adverts = server.broadcast_adverts()
    assert server.receive_advert(ads[2]).reason == "out_of_phase"  # phase closed
    assert all(isinstance(a, KeyAdvert) for a in adverts)
    shares = {c: clients[c].share_keys(adverts) for c in range(2)}
    assert all(isinstance(s, EncryptedShare) for s in shares[0])
    assert server.receive_shares(shares[0][:1]).reason == "malformed"  # misses a recipient
    assert server.receive_shares(shares[0]) is None
    assert server.receive_shares(shares[0]).reason == "duplicate"
    assert server.receive_shares(shares[1]) is None
    routed = server.routed_shares()  # client 2 never shared: not in U2
    assert set(routed) == {0, 1} and [s.sender for s in routed[0]] == [1]
    late = MaskedInput(2, 0, 0.5, np.zeros(4, dtype=np.uint64))
    assert server.receive_masked(late).reason == "out_of_phase"
    assert server.receive_masked(MaskedInput(0, 0, 0.5, np.zeros(4))).reason == "malformed"  # float64


def test_bytes_per_client_m100_n10():
    """Fixed-width wire sizes: advert 16 + 2*32; share upload 9 * (24 + 164) (148-byte
    plaintext + GCM tag); masked 24 + 8*100; unmask 16 + 10 * (8 + 66)."""
    cfg = SecureAggConfig(num_clients=10, threshold=6)
    vectors, weights = problem(43, 10, 100)
    res = secure_weighted_sum(vectors, weights, cfg, round=0, random_bytes=rb(43))
    b = res.bytes_per_client
    assert (b["advertise"], b["share"], b["masked"], b["unmask"]) == (80, 1692, 824, 756)
    assert b["uplink"] == 80 + 1692 + 824 + 756
    assert b["downlink"] == 10 * 80 + 1692 + (24 + 8 * 10)
