"""The in-process simulator: byte and pass accounting, determinism, learning, EMA."""
import numpy as np
import pytest
import torch

from baffle import runs
from baffle.config import RunConfig
from baffle.data import partition
from baffle.flatmodel import FlatModel
from baffle.models import ModelSpec, build_model
from baffle.modes import Algorithm, ClientData, RoundPlan, client_update, fedsgd_clients
from baffle.server import Server, ServerOptions
from baffle.simulation import Simulator


def make_sim(synth, clients=4, model="linear", fraction=1.0, server=None, per_forward=16, **algo):
    train, test = synth
    parts = partition(train.y.numpy(), clients, "iid", np.random.default_rng(0))
    net = build_model(ModelSpec(model, image_size=16), generator=torch.Generator().manual_seed(0))
    return Simulator(net, [train.subset(p) for p in parts], test, Algorithm(**algo),
                     server or ServerOptions("adam", 0.01), client_fraction=fraction, seed=3,
                     train_eval_size=200, clients_per_forward=per_forward)


@pytest.mark.parametrize("k", [1, 7, 20])
def test_fedsgd_uplink_is_4k_bytes_per_client(synth, k):
    sim = make_sim(synth, clients=5, num_perturbations=k, batch_size=8)
    plan = RoundPlan(0, 1, sim.server.weights.clone())
    upload, _ = client_update(sim.engine, sim.clients[0], plan, sim.algorithm)
    assert upload.vector.dtype == torch.float32 and upload.vector.shape == (k,) and upload.nbytes == 4 * k
    r1, r2 = sim.step(evaluate=False), sim.step(evaluate=False)
    assert r1.uplink_bytes == r2.uplink_bytes == 5 * 4 * k
    assert r1.downlink_bytes == 5 * (4 * sim.n + 8)
    assert r1.forward_passes == 5 * (k + 1) and r2.forward_passes == 10 * (k + 1)
    assert r1.backward_passes == 0 and r1.test_top1 is None


def test_central_scheme_counts_2k_passes(synth):
    sim = make_sim(synth, clients=3, num_perturbations=6, scheme="central")
    assert sim.step(evaluate=False).forward_passes == 3 * 12


def test_fedavg_and_backprop_accounting(synth):
    sim = make_sim(synth, clients=3, mode="fedavg", num_perturbations=4, batch_size=50, local_epochs=2)
    r = sim.step(evaluate=False)
    steps = 2 * (200 // 50)  # 200 examples per client, 4 batches an epoch, 2 epochs
    assert r.uplink_bytes == 3 * 4 * sim.n  # model delta
    assert r.forward_passes == 3 * steps * 5 and r.backward_passes == 0
    bp = make_sim(synth, clients=3, mode="fedsgd", method="backprop", batch_size=10)
    r = bp.step(evaluate=False)
    assert r.uplink_bytes == 3 * 4 * bp.n and r.forward_passes == 3 and r.backward_passes == 3


def test_batched_clients_get_the_scalars_they_would_get_alone(synth):
    sim = make_sim(synth, clients=4, model="lenet", num_perturbations=5, batch_size=8)
    plan = RoundPlan(2, 99, sim.server.weights.clone())
    alone = [client_update(sim.engine, c, plan, sim.algorithm)[0].vector for c in sim.clients]
    together = [up.vector for up, _ in fedsgd_clients(sim.engine, sim.clients, plan, sim.algorithm)]
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3)  # u = d/sigma: fp32 loss rounding / 1e-4


def test_same_seed_twice_gives_identical_metrics(synth):
    runs = []
    for _ in range(2):
        sim = make_sim(synth, clients=4, num_perturbations=5, batch_size=8, fraction=0.5)
        runs.append([sim.step().to_dict() for _ in range(3)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("mode,extra", [("fedsgd", {}), ("fedavg", {"local_steps": 3})])
def test_restored_state_continues_exactly(synth, mode, extra):
    """A simulator rebuilt from state_dict after round 2 produces the same rounds 3-4."""
    kw = dict(clients=3, mode=mode, num_perturbations=4, batch_size=8, fraction=0.7, **extra)
    sim = make_sim(synth, **kw)
    sim.step(evaluate=False), sim.step(evaluate=False)
    state = sim.state_dict()
    expected = [sim.step().to_dict() for _ in range(2)]
    fresh = make_sim(synth, **kw)
    fresh.load_state_dict(state)
    assert [fresh.step().to_dict() for _ in range(2)] == expected


def test_client_sampling_fraction(synth):
    sim = make_sim(synth, clients=10, fraction=0.3, num_perturbations=2)
    chosen = [tuple(sim.sampled_clients(t)) for t in range(20)]
    assert all(len(c) == 3 and len(set(c)) == 3 for c in chosen)
    assert len(set(chosen)) > 5  # different clients in different rounds
    assert sim.step(evaluate=False).clients == 3


@pytest.mark.parametrize("mode,method,rounds,extra", [
    ("fedsgd", "baffle", 60, dict(num_perturbations=50, batch_size=16)),
    ("fedavg", "baffle", 3, dict(num_perturbations=20, batch_size=16, client_lr=0.01)),
    ("fedsgd", "backprop", 20, dict(batch_size=16)),
    ("fedavg", "backprop", 2, dict(batch_size=16, client_lr=0.01)),
])
def test_short_run_beats_chance(synth, mode, method, rounds, extra):
    """Seeded; 10 classes, so chance is 10%: every mode must reach at least 40%."""
    server = ServerOptions("sgd", 1.0) if mode == "fedavg" else ServerOptions("adam", 0.01)
    sim = make_sim(synth, clients=4, mode=mode, method=method, server=server, **extra)
    first = sim.step()
    for _ in range(rounds - 1):
        last = sim.step(evaluate=False)
    last = sim.step()
    assert last.test_top1 >= 0.4, (first.test_top1, last.test_top1)
    assert last.test_loss < first.test_loss


def test_ema_uses_exactly_its_decay():
    server = Server(torch.zeros(3), ServerOptions("sgd", 1.0, ema_decay=0.8))
    ws = []
    for g in ([-1.0, 0, 0], [0, -2.0, 0], [0, 0, -4.0]):
        server.step(torch.tensor(g))
        ws.append(server.weights.clone())
    d = 0.8
    weights = torch.tensor([d**2, d, 1.0]) * (1 - d)
    expected = sum(wi * x for wi, x in zip(weights, ws)) / (1 - d**3)
    torch.testing.assert_close(server.eval_weights(), expected)
    assert not torch.equal(server.eval_weights(), server.weights)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_is_coupled_l2(optimizer):
    """Steps with decay lambda equal steps without it on the gradient g + lambda W_t (exact), and differ
    from steps on g alone."""
    w0, lam = torch.tensor([1.0, -2.0, 0.5]), 0.05
    grads = [torch.tensor([0.3, 0.1, -0.2]), torch.tensor([-0.1, 0.4, 0.2])]
    decayed = Server(w0, ServerOptions(optimizer, 0.1, weight_decay=lam))
    coupled, undecayed = Server(w0, ServerOptions(optimizer, 0.1)), Server(w0, ServerOptions(optimizer, 0.1))
    for g in grads:
        coupled.step(g + lam * coupled.weights)
        decayed.step(g)
        undecayed.step(g)
    torch.testing.assert_close(decayed.weights, coupled.weights, rtol=0, atol=0)
    assert (decayed.weights - undecayed.weights).abs().min() > 1e-4


def test_loaded_server_state_keeps_the_options_it_is_given():
    """A snapshot carries its optimiser's hyper-parameters; the options of the server it is loaded into win."""
    old = Server(torch.ones(2), ServerOptions("adam", 0.1))
    old.step(torch.tensor([0.5, -0.5]))
    new = Server(torch.zeros(2), ServerOptions("adam", 0.1, betas=(0.8, 0.9), weight_decay=0.01))
    new.load_state_dict(old.state_dict())
    group = new.opt.param_groups[0]
    assert (group["weight_decay"], tuple(group["betas"])) == (0.01, (0.8, 0.9))
    assert torch.equal(new.weights, old.weights) and new.steps == 1


def test_fedavg_client_weight_decay_shrinks_the_local_step_by_lr_lambda_w(synth):
    """One local SGD step: the upload moves by exactly lr * lambda * W0 (float32 rounding)."""
    def upload(decay):
        sim = make_sim(synth, mode="fedavg", method="backprop", client_optimizer="sgd", client_lr=0.1,
                       local_steps=1, client_weight_decay=decay, server=ServerOptions("sgd", 1.0))
        plan = RoundPlan(0, 1, sim.server.weights.clone())
        return client_update(sim.engine, sim.clients[0], plan, sim.algorithm)[0].vector, plan.weights

    plain, w0 = upload(0.0)
    decayed, _ = upload(0.5)
    torch.testing.assert_close(plain - decayed, 0.1 * 0.5 * w0, rtol=1e-4, atol=1e-6)  # w - lr (g + lambda w)


def test_run_config_weight_decays_reach_the_client_and_server_optimisers():
    config = RunConfig(dataset="synthetic", model="linear", mode="fedavg", num_clients=2, rounds=1,
                       client_weight_decay=0.02, server_weight_decay=5e-4)
    sim = runs.build(config).simulator
    assert sim.algorithm.client_weight_decay == 0.02
    assert sim.server.opt.param_groups[0]["weight_decay"] == 5e-4


def test_server_refuses_non_finite_update():
    server = Server(torch.zeros(2), ServerOptions())
    with pytest.raises(FloatingPointError):
        server.step(torch.tensor([float("nan"), 0.0]))
    assert torch.equal(server.weights, torch.zeros(2))


def test_models_are_never_perturbed_through_buffers():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="buffers"):
        FlatModel(net)


def test_client_batches_are_seeded_and_cover_an_epoch(synth):
    train, _ = synth
    c = ClientData(0, train.subset(np.arange(100)), seed=1)
    ys = torch.cat([c.batch(i, 10)[1] for i in range(10)])
    assert sorted(ys.tolist()) == sorted(train.y[:100].tolist())
    assert torch.equal(c.batch(3, 10)[0], ClientData(0, train.subset(np.arange(100)), seed=1).batch(3, 10)[0])
    assert not torch.equal(c.batch(0, 10)[1], c.batch(10, 10)[1])  # next epoch, new order


def test_cosine_schedule_is_explicit_and_exact():
    opts = ServerOptions("sgd", 0.1, schedule="cosine", total_steps=4)
    server = Server(torch.zeros(1), opts)
    ws = [0.0]
    for _ in range(4):
        server.step(torch.tensor([-1.0]))
        ws.append(float(server.weights))
    steps = [b - a for a, b in zip(ws, ws[1:])]
    expected = [0.1 * (1 + np.cos(np.pi * t / 4)) / 2 for t in range(4)]
    np.testing.assert_allclose(steps, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        ServerOptions(schedule="cosine")
    with pytest.raises(ValueError, match="'step'"):
        ServerOptions(schedule="step")
    assert ServerOptions("sgd", 0.1).lr_at(1000) == 0.1  # constant by default


def test_secure_fedsgd_run_matches_plain_within_quantisation(synth):
    """Same seed with and without secure aggregation.

    One round from the same W: the secure aggregate differs from the plain one by at
    most n 2^-(f+1) per scalar (+ float32 rounding of the plain sum, 2^-24 |u|), so with
    server SGD each weight moves by at most lr * max|z| * that (max|z| <= 6.7 for the
    stream's 32-bit uniforms). Over a run, forward differences at sigma = 1e-4 amplify
    any change of W by ~eps32 |L| / sigma per scalar, so the runs are compared by their
    result: final test loss within 1% and accuracy within 2 points."""
    from baffle.aggregation.options import SecureOptions

    kw = dict(clients=4, num_perturbations=8, batch_size=8, server=ServerOptions("sgd", 0.05))
    plain, secure = make_sim(synth, **kw), make_sim(synth, **kw)
    secure.secure = SecureOptions(fraction_bits=24)
    a, b = plain.step(evaluate=False), secure.step(evaluate=False)
    assert b.skipped is None and b.secure_extra_bytes > 0
    u_max = 50.0  # generous bound on |u| for this problem (measured ~13)
    bound = 0.05 * 6.7 * (4 * 2.0**-25 + 2.0**-24 * u_max)
    assert (plain.server.weights - secure.server.weights).abs().max() <= bound
    for _ in range(18):
        plain.step(evaluate=False), secure.step(evaluate=False)
    a, b = plain.step(), secure.step()
    assert abs(a.test_loss - b.test_loss) < 0.01 * a.test_loss
    assert abs(a.test_top1 - b.test_top1) <= 0.02


def test_secure_fedavg_round_equals_plain_round(synth):
    """FedAvg uploads model deltas (n floats); one secure round from the same W moves
    the weights by the same amount within the quantisation bound n 2^-(f+1) (server
    SGD lr 1: the delta is applied as is), plus float32 rounding of the plain sum."""
    from baffle.aggregation.options import SecureOptions

    kw = dict(clients=3, mode="fedavg", num_perturbations=4, batch_size=16, local_steps=2,
              server=ServerOptions("sgd", 1.0))
    plain, secure = make_sim(synth, **kw), make_sim(synth, **kw)
    secure.secure = SecureOptions()
    plain.step(evaluate=False)
    record = secure.step(evaluate=False)
    assert record.skipped is None and record.secure_extra_bytes > 0
    assert (plain.server.weights - secure.server.weights).abs().max() <= 3 * 2.0**-25 + 1e-6


def test_secure_round_below_threshold_is_skipped(synth):
    from baffle.aggregation.options import SecureOptions

    sim = make_sim(synth, clients=4, num_perturbations=4, batch_size=8)
    sim.secure = SecureOptions(dropout=0.5)  # 2 of 4 survive; threshold 3
    before = sim.server.weights.clone()
    record = sim.step(evaluate=False)
    assert record.skipped and "threshold" in record.skipped
    assert torch.equal(sim.server.weights, before)
    sim.secure = SecureOptions(dropout=0.25)  # 3 of 4 survive: the round goes through
    record = sim.step(evaluate=False)
    assert record.skipped is None and record.rejected == ()
    # every sender's bytes count: the dropped client's keys and shares too
    assert record.uplink_bytes > 3 * (record.secure_extra_bytes + 4 * 4)
    assert record.downlink_bytes > 4 * (4 * sim.n + 8)  # weights + the protocol's messages
    assert not torch.equal(sim.server.weights, before)
