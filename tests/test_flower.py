"""baffle on Flower: simulation (Ray backend), faults, `flwr run`, deployment on loopback.

Agreement with the in-process engine is tested at clients_per_forward 1: each client
then evaluates exactly the forward passes a Flower node evaluates, so the runs may
differ only by float rounding of different thread counts (tolerance 1e-6 relative).
"""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.clientapp import ClientApp
from ray import cloudpickle

from baffle import runs
from baffle.config import resolve
from baffle.edge import Refused
from baffle.flower import APP_DIR
from baffle.flower.local import free_port
from baffle.flower.client_app import identify as baffle_identify
from baffle.flower.client_app import train as baffle_train
from baffle.flower.task import OFFLINE_ENV
from test_cli import baffle as cli_baffle
from test_cli import BAFFLE, rows, wait_until

VENV_BIN = Path(sys.executable).parent
SMALL = ["--dataset", "synthetic", "--model", "lenet", "--num-perturbations", "10", "--batch-size", "16",
         "--num-clients", "4", "--eval-every", "1", "--train-eval-size", "100", "--threads", "2"]
ENV = {**os.environ, **OFFLINE_ENV, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
CLOSE = dict(rel=1e-6, abs=1e-9)
# `make test` runs each test file on one pytest-xdist worker (--dist loadfile), so these run one after
# another: the Ctrl-C test counts the machine's Ray processes, which a parallel Ray test would add to.
# The deployment tests (no Ray) are in test_flower_deployment.py, free to run beside them.


baffle = functools.partial(cli_baffle, timeout=600, env=ENV)  # Ray's start-up needs the longer timeout


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        for key in ("round", "clients", "forward_passes", "backward_passes", "uplink_bytes", "downlink_bytes",
                    "skipped", "rejected"):
            assert x[key] == y[key], (key, x, y)
        for key in ("test_top1", "test_loss", "train_loss", "client_loss"):
            assert x[key] == pytest.approx(y[key], **CLOSE), (key, x, y)


@pytest.mark.parametrize("mode", [["--mode", "fedsgd"], ["--mode", "fedavg", "--local-steps", "2"],
                                  ["--mode", "fedsgd", "--secure-aggregation"]],
                         ids=["fedsgd", "fedavg", "fedsgd-secure"])
def test_flower_simulation_matches_the_in_process_engine(tmp_path, mode):
    args = [*SMALL, *mode, "--rounds", "3", "--clients-per-forward", "1"]
    baffle("run", *args, "--out", tmp_path / "inproc", "--quiet")
    out = baffle("run", *args, "--engine", "flower", "--out", tmp_path / "flower")
    assert "final test accuracy" in out.stdout
    run = tmp_path / "flower"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json", "curves.png",
                                                "model.safetensors", "checkpoint.pt"}
    assert json.loads((run / "config.json").read_text())["engine"] == "flower"
    assert_same_run(tmp_path / "inproc", run)
    a = json.loads((tmp_path / "inproc" / "summary.json").read_text())
    b = json.loads((run / "summary.json").read_text())
    assert b["forward_passes_total"] == a["forward_passes_total"] > 0
    assert b["final_test_loss"] == pytest.approx(a["final_test_loss"], **CLOSE)


def ray_processes() -> set[int]:
    """Pids of Ray's raylet and GCS server processes on this machine."""
    found = set()
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("raylet", "gcs_server"):
                found.add(int(comm.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return found


def test_ctrl_c_on_flower_records_no_broken_round_and_the_run_resumes(tmp_path):
    args = [*SMALL, "--rounds", "30", "--clients-per-forward", "1"]
    baffle("run", *args, "--out", tmp_path / "inproc", "--quiet")
    run = tmp_path / "flower"
    before = ray_processes()
    proc = subprocess.Popen([*BAFFLE, "run", *args, "--engine", "flower", "--out", str(run), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_until(lambda: (run / "metrics.jsonl").exists() and len(rows(run)) >= 3, time.time() + 300, every=0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"baffle run --resume {run}" in err, err[-2000:]
    # the run's Ray cluster is shut down, not left behind
    assert wait_until(lambda: not ray_processes() - before, time.time() + 30, every=0.5), ray_processes() - before
    done = rows(run)
    assert 3 <= len(done) < 30 and all(r["skipped"] is None and not r["rejected"] for r in done)
    baffle("run", "--resume", run, "--quiet")
    assert_same_run(tmp_path / "inproc", run)


# ---- faults: one node crashes, one sends a malformed reply ---------------------------------

faulty_app = ClientApp()
faulty_app.query()(baffle_identify)


@faulty_app.train()
def _faulty_train(msg, context):
    pid = int(context.node_config["partition-id"])
    if pid == 1:
        raise RuntimeError("node 1 crashed on purpose")
    reply = baffle_train(msg, context)
    if pid == 2:  # three scalars where K are due
        from flwr.app import Array, ArrayRecord

        reply.content["upload"] = ArrayRecord(array_dict={"vector": Array(np.zeros(3, np.float32))})
    return reply


class _Refuses:
    def probe(self, *args):
        raise Refused("left out in the reference run")


def _fault_config(**over):
    return resolve("quick", {"dataset": "synthetic", "num_clients": 4, "rounds": 2, "num_perturbations": 10,
                             "batch_size": 16, "train_eval_size": 100, "eval_every": 1,
                             "clients_per_forward": 1, "engine": "flower", **over})


def test_crashed_and_malformed_nodes_are_left_out_and_the_round_goes_on(tmp_path):
    from baffle.flower import simulate

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray actors unpickle the faulty app
    config = _fault_config()
    summary = simulate.run(config, tmp_path / "run", resume=False, setup=runs.build(config), client_app=faulty_app)
    got = rows(tmp_path / "run")
    assert summary["rounds"] == 2
    for r in got:
        assert r["skipped"] is None and r["clients"] == 4
        assert len(r["rejected"]) == 2, r["rejected"]
        crash, bad = sorted(r["rejected"])
        assert crash.startswith("client 1, train: node ") and "node 1 crashed on purpose" in crash
        assert bad.startswith("client 2, train: malformed reply: vector of shape (3,)")
    # the model moved exactly as in an in-process run in which clients 1 and 2 are left out
    ref = runs.build(config)
    sim = ref.simulator
    sim.edge_clients = {1: _Refuses(), 2: _Refuses()}
    for r in got:
        want = sim.step(evaluate=True)
        assert r["test_loss"] == pytest.approx(want.test_loss, **CLOSE)
        assert r["client_loss"] == pytest.approx(want.client_loss, **CLOSE)
        assert r["uplink_bytes"] == want.uplink_bytes == 2 * 10 * 4


def test_too_few_replies_skip_the_round_and_keep_the_model(tmp_path):
    from baffle.flower import simulate

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = _fault_config(min_replies=3)  # only clients 0 and 3 reply
    setup = runs.build(config)
    w0 = setup.simulator.server.weights.clone()
    simulate.run(config, tmp_path / "run", resume=False, setup=setup, client_app=faulty_app)
    got = rows(tmp_path / "run")
    assert [r["skipped"] for r in got] == ["2 of 4 clients replied, fewer than min_replies 3"] * 2
    assert torch.equal(setup.simulator.server.weights, w0)
    assert got[0]["test_loss"] == got[1]["test_loss"]


# ---- secure aggregation carried over Flower messages ------------------------------------------

class SpyGrid:
    """A Grid that keeps a copy of every reply the ServerApp receives."""

    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the ServerApp pulls replies itself (pull_messages)")


def test_secure_aggregation_on_flower_shows_the_server_only_masked_vectors(tmp_path):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from baffle.flower.client_app import app
    from baffle.flower.server_app import serve

    config = _fault_config(secure_aggregation=True, rounds=2)
    seen = {}
    server = ServerApp()

    @server.main()
    def _main(grid, context):
        spy = SpyGrid(grid)
        seen["summary"] = serve(spy, config, tmp_path / "run")
        seen["replies"] = spy.replies

    run_simulation(server, app, num_supernodes=4, backend_config={"init_args": {"num_cpus": 2}})
    assert seen["summary"]["rounds"] == 2
    kinds = {r.metadata.message_type for r in seen["replies"]}
    assert kinds == {"query", "train.secagg_advertise", "train.secagg_share", "train.secagg_masked",
                     "train.secagg_unmask"}
    # no reply carries an upload: the masked phase sends uint64 words that look uniform
    # (a float32 K=10 upload scaled by 1/4 and encoded at 2^-24 would be < 2^30 in magnitude)
    masked = [r.content["masked"]["y"].numpy() for r in seen["replies"] if r.metadata.message_type.endswith("masked")]
    assert len(masked) == 2 * 4 and all("upload" not in r.content for r in seen["replies"])
    words = np.concatenate(masked).view(np.int64)
    assert words.dtype == np.int64 and np.mean(np.abs(words) > 2**40) > 0.95
    # and the model moved exactly as in process with the same protocol
    ref = runs.build(config.__class__(**{**config.to_dict(), "engine": "loop"}))
    for r in rows(tmp_path / "run"):
        want = ref.simulator.step(evaluate=True)
        assert r["rejected"] == [] and r["skipped"] is None
        assert r["test_loss"] == pytest.approx(want.test_loss, **CLOSE)
        assert r["uplink_bytes"] == want.uplink_bytes and r["secure_extra_bytes"] == want.secure_extra_bytes


# ---- `flwr run` with a local simulation federation -------------------------------------------

def test_flwr_run_on_a_local_simulation_federation(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = ":local:"\n'
        "options.num-supernodes = 4\noptions.backend.init-args.num-cpus = 2\n")
    env = {**ENV, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    run = tmp_path / "run"
    try:
        out = subprocess.run([str(VENV_BIN / "flwr"), "run", str(APP_DIR), "--stream", "--run-config",
                              f'out="{run}" options="dataset=synthetic num-clients=4 rounds=2 num-perturbations=10"'],
                             capture_output=True, text=True, env=env, timeout=400)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finally:  # flwr leaves its local SuperLink running; it is the one process that names our FLWR_HOME
        subprocess.run(["pkill", "-f", str(home)])
    assert "baffle: round 2 done, 4 clients" in out.stdout + out.stderr
    assert json.loads((run / "summary.json").read_text())["forward_passes_total"] == 2 * 4 * 11
    assert wait_until(lambda: not _processes_mentioning(str(home)), time.time() + 20, every=0.5), \
        _processes_mentioning(str(home))


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]
