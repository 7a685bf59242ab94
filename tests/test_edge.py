"""Inference-only clients (baffle.edge): ONNX Runtime + NumPy, no torch.

Equality with the torch client is checked to a stated tolerance: both runtimes
compute float32 logits with different convolution kernels, so each loss may
differ by a few float32 ulps of |L|, and u_k = (L_k - L_0) / sigma by that over
sigma. Bound used: |u_onnx - u_torch| <= 4 eps32 |L| / sigma per scalar
(observed <= 0.4 on LeNet and WRN-10-2), and 2e-3 relative in the 2-norm.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from baffle.aggregation.options import SecureOptions
from baffle.data import partition
from baffle.edge import OnnxClient, Refused
from baffle.edge.export import export_onnx
from baffle.engine import Engine
from baffle.estimators import ProbePlan, probe_blocks
from baffle.flatmodel import FlatModel
from baffle.models import ModelSpec, build_model
from baffle.modes import Algorithm
from baffle.server import ServerOptions
from baffle.simulation import Simulator

EPS32 = float(np.finfo(np.float32).eps)
MODELS = {"lenet": ModelSpec("lenet", image_size=16), "wrn-10-2": ModelSpec("wrn-10-2", image_size=16, norm="group"),
          "mlp": ModelSpec("mlp", image_size=16)}


def model(name: str, seed: int = 0) -> torch.nn.Module:
    return build_model(MODELS[name], generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported():
    return {name: export_onnx(model(name), (1, 16, 16)) for name in MODELS}


def batch(b: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)


def torch_probe(net, x, y, plan):
    """(W, layout, u, L(W)) of the torch client (the model's storage ends up perturbed)."""
    flat = FlatModel(net)
    w = flat.weights()
    engine = Engine(flat, "loop")
    seg = torch.zeros(len(y), dtype=torch.int64)
    r = probe_blocks(lambda v: engine.losses(v, x, y, seg, 1),
                     lambda v, z, s: engine.perturbed_losses(v, z, s, x, y, seg, 1), w, plan, 8)
    return w.numpy(), flat.layout, r.u[:, 0].numpy(), float(r.loss_at_w[0])


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("name", ["lenet", "wrn-10-2"])
def test_onnx_client_returns_the_torch_clients_scalars(exported, name, scheme):
    net = model(name)
    x, y = batch()
    plan = ProbePlan(2**63 + 12345, 24, 1e-4, scheme, stream=3)
    w, layout, u_torch, loss = torch_probe(net, x, y, plan)
    reply = OnnxClient(exported[name]).probe(w, x.numpy(), y.numpy(), plan, layout)
    assert reply.u.dtype == np.float32 and reply.u.shape == (24,)
    assert reply.forward_passes == plan.forward_passes
    assert abs(reply.loss_at_w - loss) <= 4 * EPS32 * loss
    bound = 4 * EPS32 * loss / plan.sigma
    assert np.abs(reply.u - u_torch).max() <= bound
    assert np.linalg.norm(reply.u - u_torch) <= 2e-3 * np.linalg.norm(u_torch)


def test_onnx_client_runs_without_torch(tmp_path, exported):
    """A process where importing torch fails builds the client and probes."""
    path = tmp_path / "lenet.onnx"
    path.write_bytes(exported["lenet"])
    net = model("lenet")
    x, y = batch(8)
    flat = FlatModel(net)
    np.save(tmp_path / "w.npy", flat.weights().numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from baffle.edge import OnnxClient\n"
        "from baffle.plan import ProbePlan\n"
        f"d = {str(tmp_path)!r}\n"
        "c = OnnxClient(d + '/lenet.onnx')\n"
        "r = c.probe(np.load(d + '/w.npy'), np.load(d + '/x.npy'), np.load(d + '/y.npy'), ProbePlan(7, 5, 1e-4))\n"
        "print(' '.join(repr(float(v)) for v in r.u))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    _, _, u_torch, loss = torch_probe(model("lenet"), x, y, ProbePlan(7, 5, 1e-4))
    u = np.array([float(v) for v in lines[0].split()])  # torch was unimportable there: any import would fail
    assert np.abs(u - u_torch).max() <= 4 * EPS32 * loss / 1e-4


def test_export_declares_weights_as_input_and_layout(exported):
    client = OnnxClient(exported["wrn-10-2"])
    flat = FlatModel(model("wrn-10-2"))
    assert client.refusal is None and client.n == flat.n
    assert client.layout == flat.layout and client.example_shape == (1, 16, 16) and client.num_classes == 10
    assert len(exported["wrn-10-2"]) < flat.n  # the weights (4n bytes) are inputs, not stored in the file


# ---- bad input: the client refuses with a named reason, never crashes -----------------

def refusal(client: OnnxClient, **change) -> str:
    flat = FlatModel(model("lenet"))
    x, y = batch(4)
    args = {"weights": flat.weights().numpy(), "x": x.numpy(), "y": y.numpy(),
            "plan": ProbePlan(1, 4, 1e-4), "layout": flat.layout, **change}
    with pytest.raises(Refused) as e:
        client.probe(**args)
    return str(e.value)


def test_a_file_that_is_not_onnx_is_refused_every_round(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model\n")
    client = OnnxClient(bad)
    assert "is not a loadable ONNX model" in client.refusal and str(bad) in client.refusal
    assert refusal(client) == client.refusal
    assert "not a loadable ONNX model" in OnnxClient(tmp_path / "missing.onnx").refusal


def test_weights_that_do_not_fit_the_model_are_refused(exported):
    client = OnnxClient(exported["lenet"])
    wrn = FlatModel(model("wrn-10-2"))
    assert "do not match the model input 'w'" in refusal(client, weights=wrn.weights().numpy())
    lenet = FlatModel(model("lenet"))
    assert "float32" in refusal(client, weights=lenet.weights().numpy().astype(np.float64))
    # same number of weights, other parameter shapes: the layout check names the first difference
    entries = list(lenet.layout.entries)
    name, shape, off = entries[0]
    swapped = type(lenet.layout)((( name, (shape[1], shape[0], *shape[2:]), off), *entries[1:]))
    msg = refusal(client, layout=swapped)
    assert "parameter 0" in msg and "features.0.weight" in msg
    w = lenet.weights().numpy().copy()
    w[5] = np.nan
    assert "NaN" in refusal(client, weights=w)


@pytest.mark.parametrize("plan,needle", [
    ({"seed": 2**64, "num_perturbations": 4, "sigma": 1e-4}, "seed must be an integer in [0, 2^64), got 18446744073709551616"),
    ({"seed": -1, "num_perturbations": 4, "sigma": 1e-4}, "seed must be an integer in [0, 2^64), got -1"),
    ({"seed": "7", "num_perturbations": 4, "sigma": 1e-4}, "seed must be an integer"),
    ({"seed": 1, "num_perturbations": 0, "sigma": 1e-4}, "K) must be an integer >= 1, got 0"),
    ({"seed": 1, "num_perturbations": 10**6, "sigma": 1e-4}, "K = 1000000 exceeds this client's maximum 100000"),
    ({"seed": 1, "num_perturbations": 4, "sigma": float("nan")}, "sigma must be > 0"),
    ({"seed": 1, "num_perturbations": 4, "sigma": 1e-4, "scheme": "backward"}, "unknown scheme 'backward'"),
    ({"seed": 1, "num_perturbations": 4, "sigma": 1e-4, "extra": 1}, "bad round plan"),
])
def test_plans_out_of_range_are_refused(exported, plan, needle):
    assert needle in refusal(OnnxClient(exported["lenet"]), plan=plan)


def test_malformed_batches_are_refused(exported):
    client = OnnxClient(exported["lenet"])
    x, y = batch(4)
    assert "does not match the model input 'x'" in refusal(client, x=np.zeros((4, 3, 16, 16), np.float32))
    assert "does not match the model input 'x'" in refusal(client, x=x.numpy()[:0], y=y.numpy()[:0])
    assert "labels must be in [0, 10), got range" in refusal(client, y=np.array([0, 1, 2, 10]))
    assert "do not match the batch of 4" in refusal(client, y=y.numpy()[:3])


# ---- federated runs with ONNX clients ------------------------------------------------

def make_sim(synth, edge: dict, name="lenet", secure=None, server=ServerOptions("adam", 0.01)):
    train, test = synth
    parts = partition(train.y.numpy(), 4, "iid", np.random.default_rng(0))
    algo = Algorithm(num_perturbations=20, batch_size=16)
    return Simulator(model(name), [train.subset(p) for p in parts], test, algo, server,
                     seed=3, train_eval_size=200, edge_clients=edge, secure=secure)


def test_runs_with_onnx_clients_train_as_well_as_all_torch(synth, exported):
    """Seeded, 150 FedSGD rounds (K=20) of the MLP on the synthetic problem, where
    training converges (the all-torch run reaches ~95%): with half or all of the
    clients on ONNX Runtime the final test accuracy is within 2 points and the test
    loss within 5% of the all-torch run's. (On LeNet the trajectories are chaotic:
    sigma = 1e-4 amplifies float rounding, and 120-round accuracies of equally good
    runs spread by 10 points, so LeNet is compared round by round below.)"""
    client = OnnxClient(exported["mlp"])
    finals = {}
    for kind, edge in {"torch": {}, "half": {0: client, 2: client}, "all": dict.fromkeys(range(4), client)}.items():
        sim = make_sim(synth, edge, "mlp")
        first = sim.step(evaluate=False)
        assert first.forward_passes == 4 * 21 and first.uplink_bytes == 4 * 4 * 20 and first.rejected == ()
        for _ in range(149):
            record = sim.step(evaluate=False)
        assert record.forward_passes == 150 * 4 * 21
        finals[kind] = sim.model.evaluate(sim.server.eval_weights(), sim.test.x, sim.test.y)
    base = finals["torch"]
    assert base.top1 > 0.8, finals
    for kind in ("half", "all"):
        assert abs(finals[kind].top1 - base.top1) <= 0.02, (kind, finals)
        assert abs(finals[kind].loss - base.loss) <= 0.05 * base.loss, (kind, finals)


def test_first_round_matches_torch(synth, exported):
    """LeNet, one server SGD step (lr 0.01) from the same start: every weight moves by
    lr (1/K) sum_k u_k z_k, so the two runs' weights differ by at most
    lr * max|du| * max|z| with max|du| <= 4 eps32 L / sigma (L < 2.5 at the start,
    |z| < 6 here), about 7e-4, against steps of up to ~0.3."""
    server = ServerOptions("sgd", 0.01)
    torch_sim = make_sim(synth, {}, server=server)
    onnx_sim = make_sim(synth, dict.fromkeys(range(4), OnnxClient(exported["lenet"])), server=server)
    w0 = torch_sim.server.weights.clone()
    a, b = torch_sim.step(evaluate=False), onnx_sim.step(evaluate=False)
    assert a.client_loss < 2.5 and abs(a.client_loss - b.client_loss) <= 4 * EPS32 * a.client_loss
    bound = 0.01 * (4 * EPS32 * 2.5 / 1e-4) * 6
    step = (torch_sim.server.weights - w0).abs().max()
    assert (torch_sim.server.weights - onnx_sim.server.weights).abs().max() <= bound < step


def test_refusing_clients_are_left_out_and_a_round_without_replies_changes_nothing(synth, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    refuser = OnnxClient(bad)
    sim = make_sim(synth, {1: refuser})
    record = sim.step(evaluate=False)
    assert record.clients == 4 and record.skipped is None
    assert len(record.rejected) == 1 and record.rejected[0].startswith("client 1, probe: refused: ")
    assert "not a loadable ONNX model" in record.rejected[0]
    assert record.forward_passes == 3 * 21 and record.uplink_bytes == 3 * 4 * 20
    everyone = make_sim(synth, dict.fromkeys(range(4), refuser))
    before = everyone.server.weights.clone()
    record = everyone.step(evaluate=True)
    assert record.skipped == "no client replied (4 left out)" and len(record.rejected) == 4
    assert torch.equal(everyone.server.weights, before) and record.client_loss is None
    assert record.test_top1 is not None  # the unchanged model is still evaluated


def test_refusing_client_with_secure_aggregation(synth, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"")
    sim = make_sim(synth, {0: OnnxClient(bad)}, secure=SecureOptions(threshold=2))
    record = sim.step(evaluate=False)
    assert record.skipped is None and record.rejected[0].startswith("client 0, probe: refused")
    assert record.forward_passes == 3 * 21


def test_refusals_never_lower_the_secure_aggregation_threshold(synth, tmp_path):
    """4 chosen clients: threshold floor(4/2)+1 = 3. Two refusers leave 2 replies: the
    round is skipped (model unchanged), not run with a threshold lowered to 2."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"")
    refuser = OnnxClient(bad)
    sim = make_sim(synth, {0: refuser, 1: refuser}, secure=SecureOptions())
    before = sim.server.weights.clone()
    record = sim.step(evaluate=False)
    assert record.skipped == "2 of 4 clients replied, fewer than the secure-aggregation threshold 3"
    assert torch.equal(sim.server.weights, before) and len(record.rejected) == 2


class _Broken:
    """An edge client that answers with the wrong number of scalars."""

    def probe(self, weights, x, y, plan, layout):
        assert not weights.flags.writeable  # it cannot scribble on the server's weights
        return type("Reply", (), {"u": np.zeros(3, np.float32), "loss_at_w": 1.0, "forward_passes": 1})()


def test_a_malformed_reply_is_left_out(synth):
    sim = make_sim(synth, {2: _Broken()})
    record = sim.step(evaluate=False)
    assert record.rejected == ("client 2, probe: refused: malformed reply: u of shape (3,) (expected (20,)), "
                               "finite: True",)
    assert record.forward_passes == 3 * 21 and record.skipped is None


def test_edge_clients_need_fedsgd_baffle(synth, exported):
    train, test = synth
    with pytest.raises(ValueError, match="edge clients run mode fedsgd with method baffle, got fedavg/baffle"):
        Simulator(model("lenet"), [train], test, Algorithm(mode="fedavg"), edge_clients={0: OnnxClient(exported["lenet"])})
    with pytest.raises(ValueError, match="edge client id 3 is not a client"):
        Simulator(model("lenet"), [train], test, Algorithm(), edge_clients={3: OnnxClient(exported["lenet"])})


# ---- the command line --------------------------------------------------------------

def test_export_onnx_command_and_a_run_with_onnx_clients(tmp_path):
    from test_cli import SMALL, baffle, metrics

    path = tmp_path / "lenet.onnx"
    out = baffle("export-onnx", *SMALL, "--out", path)
    assert f"wrote {path}: lenet (26,730 weights as input 'w')" in out.stdout
    client = OnnxClient(path)
    assert client.refusal is None and client.n == 26_730 and client.example_shape == (1, 28, 28)
    run = tmp_path / "run"
    out = baffle("run", *SMALL, "--rounds", "2", "--onnx-clients", "2", "--onnx-model", path, "--out", run)
    assert "clients 0..1 run ONNX Runtime + NumPy (no torch)" in out.stderr
    rows = metrics(run)
    assert [r["rejected"] for r in rows] == [[], []] and rows[-1]["forward_passes"] == 2 * 4 * 11
    # without --onnx-model the run exports its own model
    baffle("run", *SMALL, "--rounds", "1", "--onnx-clients", "4", "--out", tmp_path / "run2")
    assert metrics(tmp_path / "run2")[0]["uplink_bytes"] == 4 * 4 * 10


def test_a_run_whose_onnx_model_is_broken_finishes_without_those_clients(tmp_path):
    from test_cli import SMALL, baffle, metrics

    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    run = tmp_path / "run"
    out = baffle("run", *SMALL, "--rounds", "2", "--onnx-clients", "1", "--onnx-model", bad, "--out", run)
    assert "the ONNX clients will refuse every round" in out.stderr and "Traceback" not in out.stderr
    assert "round 1: left out client 0, probe: refused" in out.stderr
    rows = metrics(run)
    assert all(len(r["rejected"]) == 1 and r["skipped"] is None for r in rows)
    assert rows[-1]["forward_passes"] == 2 * 3 * 11
    # when every client would refuse, the run is refused up front (exit 2, nothing written)
    out = baffle("run", *SMALL, "--onnx-clients", "4", "--onnx-model", bad, "--out", tmp_path / "r2", check=False)
    assert out.returncode == 2 and "every client is an ONNX client and would refuse every round" in out.stderr
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("args,needle", [
    (["--onnx-clients", "5"], "onnx_clients must be in [0, num_clients = 4], got 5"),
    (["--onnx-clients", "1", "--mode", "fedavg"], "onnx_clients need mode fedsgd with method baffle, got fedavg/baffle"),
    (["--onnx-clients", "1", "--onnx-model", "/nonexistent/m.onnx"], "onnx_model '/nonexistent/m.onnx' is not a file"),
])
def test_bad_onnx_options_are_one_line_exit_2(tmp_path, args, needle):
    from test_cli import SMALL, baffle

    run = tmp_path / "run"
    out = baffle("run", *SMALL, *args, "--out", run, check=False)
    assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not run.exists()
    out = baffle("export-onnx", *SMALL, "--out", tmp_path, check=False)
    assert out.returncode == 2 and "is a directory" in out.stderr
