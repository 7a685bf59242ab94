"""The `baffle` command end to end: run directory, resume, presets, bad input."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import baffle.config as config_module
from baffle import runs
from baffle.config import ConfigError, RunConfig, load_preset, preset_names, resolve
from baffle.modes import RoundPlan

BAFFLE = [sys.executable, "-m", "baffle.cli"]
SMALL = ["--dataset", "synthetic", "--model", "lenet", "--num-perturbations", "10", "--batch-size", "16",
         "--num-clients", "4", "--eval-every", "2", "--train-eval-size", "100"]


def baffle(*args, check=True, timeout=300, **kw):
    out = subprocess.run([*BAFFLE, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def metrics(run: Path) -> list[dict]:
    """The rows without wall_seconds, which differs between two runs of one config."""
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows(run)]


def wait_until(done, deadline: float, every: float = 0.01):
    """Call ``done()`` every ``every`` s until it is truthy or time.time() passes ``deadline``; its last value."""
    while not (value := done()) and time.time() < deadline:
        time.sleep(every)
    return value


def uninterrupted_and_killed(tmp_path: Path, rounds: int, after: int) -> tuple[Path, Path]:
    """Two runs of SMALL for ``rounds`` rounds: tmp_path/full to the end, and tmp_path/part
    SIGKILLed once ``after`` rounds are logged, before the last."""
    args = [*SMALL, "--rounds", str(rounds)]
    full, part = tmp_path / "full", tmp_path / "part"
    baffle("run", *args, "--out", full)
    proc = subprocess.Popen([*BAFFLE, "run", *args, "--out", str(part), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = part / "metrics.jsonl"
    wait_until(lambda: m.exists() and len(m.read_text().splitlines()) >= after, time.time() + 120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(m.read_text().splitlines())
    assert after <= done < rounds, "the run was not interrupted mid-way"
    assert not (part / "summary.json").exists()
    return full, part


def test_run_directory_holds_everything(tmp_path):
    run = tmp_path / "run"
    out = baffle("run", *SMALL, "--rounds", "4", "--out", run)
    assert f"run directory: {run}" in out.stdout and "final test accuracy:" in out.stdout
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json", "curves.png",
                                                "model.safetensors", "checkpoint.pt"}
    config = json.loads((run / "config.json").read_text())
    assert config == RunConfig.from_dict(config).to_dict() and config["num_perturbations"] == 10
    rows = metrics(run)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    keys = {"round", "test_top1", "test_top5", "test_loss", "train_loss", "uplink_bytes", "downlink_bytes",
            "forward_passes"}
    assert keys <= set(rows[0])
    assert rows[0]["test_top1"] is None and rows[1]["test_top1"] is not None  # eval every 2 rounds
    assert all(r["uplink_bytes"] == 4 * 4 * 10 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_top1"] == rows[-1]["test_top1"]
    assert summary["peak_rss_mb"] > 0 and summary["forward_passes_total"] == 4 * 4 * 11
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file
    weights = load_file(run / "model.safetensors")
    assert sum(t.numel() for t in weights.values()) == summary["parameters"] == 26730


def test_killed_run_resumes_to_identical_metrics(tmp_path):
    full, part = uninterrupted_and_killed(tmp_path, rounds=30, after=5)
    baffle("run", "--resume", part)
    assert metrics(part) == metrics(full)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_round_zero(tmp_path):
    full = tmp_path / "full"
    baffle("run", *SMALL, "--rounds", "4", "--out", full)
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.json").write_bytes((full / "config.json").read_bytes())
    # no checkpoint: metric lines past it (here all of them, and a torn one) must not survive the resume
    (early / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text() + '{"round": 5, "te')
    baffle("run", "--resume", early)
    assert metrics(early) == metrics(full)


MIDWAY = dict(dataset="synthetic", model="linear", num_perturbations=10, batch_size=64, num_clients=4, rounds=3,
              eval_every=1, train_eval_size=100)


class Killed(BaseException):
    """A kill no handler sees (SIGKILL, power loss): unlike KeyboardInterrupt, nothing is saved on the way out."""


def stop_at_third_client(monkeypatch, name: str, calls: list, stop: list, round_: int = 1) -> None:
    """Patch simulation.<name> (the client work) to log (round, clients) and raise
    stop[0] (an exception class, or None) at the third client of round ``round_`` (0-based)."""
    from baffle import simulation
    real = getattr(simulation, name)

    def work(engine, data, plan, algo, *rest):
        clients = [d.client for d in (data if isinstance(data, list) else [data])]
        if stop[0] and plan.round == round_ and clients[0] == 2:
            raise stop[0]
        calls.append((plan.round, clients))
        return real(engine, data, plan, algo, *rest)

    monkeypatch.setattr(simulation, name, work)


@pytest.mark.parametrize("mode, work", [("fedavg", "client_update"), ("fedsgd", "fedsgd_clients")])
def test_a_round_stopped_midway_resumes_from_its_finished_clients(tmp_path, monkeypatch, mode, work):
    """A long round (WRN-10-2 BAFFLE on a CPU) keeps its finished clients' replies in
    round.partial.pt; a resume runs only the others and ends as an uninterrupted run.
    FedSGD BAFFLE clients run two at a time here (clients_per_forward=2): whole groups are kept."""
    from baffle.report import build_report

    config = RunConfig(**MIDWAY, mode=mode, clients_per_forward=2).validate()
    full, part, stale = tmp_path / "full", tmp_path / "part", tmp_path / "stale"
    runs.execute(config, full)
    calls, stop = [], [Killed]
    stop_at_third_client(monkeypatch, work, calls, stop)
    with pytest.raises(Killed):
        runs.execute(config, part, partial_every=0)  # write the partial round after every batch of replies
    assert len(metrics(part)) == 1
    kept = torch.load(part / runs.PARTIAL, weights_only=True)
    assert kept["round"] == 1 and sorted(kept["replies"]) == [0, 1] and kept["wall_seconds"] > 0
    # the kept copy in a report carries the partial round too
    build_report([part], tmp_path / "report")
    assert (tmp_path / "report" / "runs" / "part" / runs.PARTIAL).read_bytes() == (part / runs.PARTIAL).read_bytes()
    shutil.copytree(part, stale)
    # a partial round that is not the checkpoint's next (here: round 1 of 3) is ignored
    buf = io.BytesIO()
    torch.save({"round": 0, "replies": {0: "not a reply"}, "wall_seconds": 1.0}, buf)
    (stale / runs.PARTIAL).write_bytes(buf.getvalue())

    calls.clear()
    stop[0] = None
    runs.execute(config, part, resume=True, setup=runs.build(config))
    assert [c for r, cs in calls if r == 1 for c in cs] == [2, 3]  # round 2's other clients only
    assert [c for r, cs in calls if r == 2 for c in cs] == [0, 1, 2, 3]
    assert metrics(part) == metrics(full) and not (part / runs.PARTIAL).exists()
    resumed_wall = json.loads((part / "metrics.jsonl").read_text().splitlines()[1])["wall_seconds"]
    assert resumed_wall >= kept["wall_seconds"]  # the time spent on the kept clients counts
    calls.clear()
    runs.execute(config, stale, resume=True, setup=runs.build(config))
    assert [c for r, cs in calls if r == 1 for c in cs] == [0, 1, 2, 3]
    assert metrics(stale) == metrics(full) and not (stale / runs.PARTIAL).exists()

    # with the default interval (a minute) these short rounds write no partial file before a kill;
    # a stop (Ctrl-C, or SIGTERM, which the CLI turns into the same) writes it with every finished client
    calls.clear()
    stop[0] = Killed
    with pytest.raises(Killed):
        runs.execute(config, tmp_path / "killed")
    assert not (tmp_path / "killed" / runs.PARTIAL).exists()
    stop[0] = KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        runs.execute(config, tmp_path / "quick")
    assert sorted(torch.load(tmp_path / "quick" / runs.PARTIAL, weights_only=True)["replies"]) == [0, 1]
    # a damaged partial round is named, with what to do, and nothing is run
    (tmp_path / "quick" / runs.PARTIAL).write_bytes(b"not a torch file")
    calls.clear()
    with pytest.raises(ConfigError, match=r"^cannot resume .*quick: round.partial.pt is unreadable \(\w+\); "
                                          r"delete it to redo round 2 from its start$"):
        runs.execute(config, tmp_path / "quick", resume=True, setup=runs.build(config))
    assert calls == []


def test_a_run_stopped_in_its_first_round_resumes_from_its_finished_clients(tmp_path, monkeypatch):
    """Before round 1 ends there is no checkpoint yet, only round.partial.pt (a WRN-10-2 K=200 round takes
    hours on a CPU): a resume rebuilds the starting model from the config's seed and runs only the
    clients not kept."""
    config = RunConfig(**MIDWAY, mode="fedavg").validate()
    full, part = tmp_path / "full", tmp_path / "part"
    runs.execute(config, full)
    calls, stop = [], [KeyboardInterrupt]
    stop_at_third_client(monkeypatch, "client_update", calls, stop, round_=0)
    with pytest.raises(KeyboardInterrupt):
        runs.execute(config, part)
    assert not (part / runs.CHECKPOINT).exists() and (part / "metrics.jsonl").read_text() == ""
    assert sorted(torch.load(part / runs.PARTIAL, weights_only=True)["replies"]) == [0, 1]
    calls.clear()
    stop[0] = None
    runs.execute(config, part, resume=True, setup=runs.build(config))
    assert [c for r, cs in calls if r == 0 for c in cs] == [2, 3]  # round 1's other clients only
    assert metrics(part) == metrics(full) and not (part / runs.PARTIAL).exists()


@pytest.mark.parametrize("method", ["baffle", "backprop"])
def test_a_fedavg_client_resumed_after_any_local_step_gives_the_same_delta(method):
    """A FedAvg client's progress (weights, Adam moments, counts) after step s continues it bit for bit."""
    from baffle.modes import client_update, local_steps

    sim = runs.build(RunConfig(**{**MIDWAY, "batch_size": 8}, mode="fedavg", method=method).validate()).simulator
    algo, data = sim.algorithm, sim.clients[1]
    plan = RoundPlan(1, 12345, sim.server.weights.clone())
    snapshots = []
    whole, stats = client_update(sim.engine, data, plan, algo, on_step=lambda snap: snapshots.append(snap()))
    steps = local_steps(data, algo)
    assert steps >= 3 and [p.step for p in snapshots] == list(range(1, steps + 1))
    # each resumed twice: the first resume must not change the progress it was given
    for kept in (snapshots[0], snapshots[steps // 2], snapshots[steps // 2], snapshots[-1]):
        later = []
        again, again_stats = client_update(sim.engine, data, plan, algo, resume=kept,
                                           on_step=lambda snap: later.append(snap().step))
        assert later == list(range(kept.step + 1, steps + 1))  # only the steps not done yet
        assert torch.equal(again.vector, whole.vector) and again_stats == stats
    # progress belongs to one client and round
    with pytest.raises(ValueError, match=r"^progress of client 1 at step 1 of round 2 does not continue client 2 "):
        client_update(sim.engine, sim.clients[2], plan, algo, resume=snapshots[0])


def test_a_run_stopped_within_a_fedavg_client_resumes_from_its_last_kept_step(tmp_path, monkeypatch):
    """A WRN-10-2 K=500 client takes 25 min on a CPU: round.partial.pt also keeps the running client's
    progress after its local steps, so a kill (nothing saved on the way out) loses at most the
    write interval of it; the resumed run ends as an uninterrupted one."""
    from baffle import modes, simulation

    config = RunConfig(**{**MIDWAY, "batch_size": 8}, mode="fedavg").validate()
    full, part = tmp_path / "full", tmp_path / "part"
    runs.execute(config, full)
    real_step, seen = runs.PartialRound.step, []

    def step_then_kill(self, snapshot, wall):
        real_step(self, snapshot, wall)
        seen.append((self.round, self.progress.client, self.progress.step))
        if seen[-1] == (1, 2, 3):
            raise Killed

    monkeypatch.setattr(runs.PartialRound, "step", step_then_kill)
    with pytest.raises(Killed):
        runs.execute(config, part, partial_every=0)
    kept = torch.load(part / runs.PARTIAL, weights_only=True)
    assert kept["round"] == 1 and sorted(kept["replies"]) == [0, 1]
    assert (kept["progress"]["client"], kept["progress"]["step"]) == (2, 3)
    bad, replied = tmp_path / "bad", tmp_path / "replied"  # the same with a progress of another round,
    for where, state in ((bad, {**kept, "progress": {**kept["progress"], "round": 0}}),  # and of a client
                         (replied, {**kept, "replies": {**kept["replies"], 2: "refused"}})):  # that replied
        shutil.copytree(part, where)
        buf = io.BytesIO()
        torch.save(state, buf)
        (where / runs.PARTIAL).write_bytes(buf.getvalue())

    monkeypatch.setattr(runs.PartialRound, "step", real_step)
    resumed = []

    def client(engine, data, plan, algo, resume=None, on_step=None):
        resumed.append((plan.round, data.client, resume.step if resume else 0))
        return modes.client_update(engine, data, plan, algo, resume, on_step)

    monkeypatch.setattr(simulation, "client_update", client)
    runs.execute(config, part, resume=True, setup=runs.build(config))
    assert resumed[:2] == [(1, 2, 3), (1, 3, 0)]  # client 3 from its step 3, client 4 from the start
    assert metrics(part) == metrics(full) and not (part / runs.PARTIAL).exists()
    # a progress of another round is named, and nothing is run; one of a client that replied is spent
    resumed.clear()
    with pytest.raises(ConfigError, match=r"^cannot resume .*bad: round.partial.pt is unreadable \(ValueError\); "):
        runs.execute(config, bad, resume=True, setup=runs.build(config))
    assert resumed == []
    runs.execute(config, replied, resume=True, setup=runs.build(config))
    assert resumed[:1] == [(1, 3, 0)]

    # a stop (Ctrl-C, SIGTERM) between two local steps keeps the client as of its last whole step, with
    # the default interval too (these rounds are too short for a periodic write)
    asked = []

    def asking(engine, data, plan, algo, resume=None, on_step=None):
        def hook(snapshot):
            if (plan.round, data.client) == (1, 2) and snapshot().step == 3:
                asked.append(True)
            on_step(snapshot)
        return modes.client_update(engine, data, plan, algo, resume, hook)

    def stop():
        if asked:
            raise KeyboardInterrupt

    monkeypatch.setattr(simulation, "client_update", asking)
    with pytest.raises(KeyboardInterrupt):
        runs.execute(config, tmp_path / "stopped", stop=stop)
    kept = torch.load(tmp_path / "stopped" / runs.PARTIAL, weights_only=True)
    assert sorted(kept["replies"]) == [0, 1] and (kept["progress"]["client"], kept["progress"]["step"]) == (2, 3)
    asked.clear()
    monkeypatch.setattr(simulation, "client_update", client)
    resumed.clear()
    runs.execute(config, tmp_path / "stopped", resume=True, setup=runs.build(config))
    assert resumed[:1] == [(1, 2, 3)] and metrics(tmp_path / "stopped") == metrics(full)


def test_a_resume_refuses_a_checkpoint_or_metrics_that_do_not_fit_the_run(tmp_path):
    config = RunConfig(**MIDWAY).validate()
    run, other = tmp_path / "run", tmp_path / "other"
    runs.execute(config, run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["peak_rss_mb"] > 0  # the peak memory so far travels with the checkpoint

    def resume(d):
        runs.execute(config, d, resume=True, setup=runs.build(config))

    # a line missing in the middle would give a summary and curves over a round that is not there
    shutil.copytree(run, other)
    (other / "metrics.jsonl").write_text(lines[0] + lines[2])
    with pytest.raises(ConfigError, match=r"^cannot resume .*other: metrics.jsonl has no line for round 2 in its "
                                          r"place, and checkpoint.pt is at round 3$"):
        resume(other)
    assert (other / "metrics.jsonl").read_text() == lines[0] + lines[2]  # left as it was
    # the command refuses it before it loads any data: one line, exit 2
    out = baffle("run", "--resume", other, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"baffle: error: cannot resume {other}: metrics.jsonl has no line for round 2")
    # a file that loads but is no baffle checkpoint: named, not a KeyError traceback
    (other / "metrics.jsonl").write_text("".join(lines))
    torch.save({"model": torch.zeros(3)}, other / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"^cannot resume .*other: checkpoint.pt is unreadable or not a baffle "
                                          r"checkpoint \(KeyError\)$"):
        resume(other)
    # another model's checkpoint: the weights do not fit
    lenet = RunConfig(**{**MIDWAY, "model": "lenet", "rounds": 1}).validate()
    runs.execute(lenet, tmp_path / "lenet")
    shutil.copy(tmp_path / "lenet" / "checkpoint.pt", other / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"^cannot resume .*other: checkpoint.pt does not fit this run's model "
                                          r"\(RuntimeError\)$"):
        resume(other)

    # a hand-edited peak memory that is no number: named, not a ValueError traceback
    ckpt["peak_rss_mb"] = "lots"
    torch.save(ckpt, other / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"^cannot resume .*other: checkpoint.pt is unreadable or not a baffle "
                                          r"checkpoint \(ValueError\)$"):
        resume(other)
    # summary.json's peak memory is the largest over the run's sessions, not the last one's
    ckpt["peak_rss_mb"] = 123456.0
    torch.save(ckpt, run / "checkpoint.pt")
    resume(run)  # finished: nothing to train, the summary is written again
    assert json.loads((run / "summary.json").read_text())["peak_rss_mb"] == 123456.0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_kill_says_how_to_resume(tmp_path, sig, code):
    """Ctrl-C, or SIGTERM (``kill``, a scheduler; a background job ignores SIGINT) stops a run cleanly."""
    run = tmp_path / "run"
    proc = subprocess.Popen([*BAFFLE, "run", *SMALL, "--rounds", "200", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until((run / "checkpoint.pt").exists, time.time() + 120)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == f"baffle: interrupted; continue with: baffle run --resume {run}"
    assert "Traceback" not in err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_that_library_code_swallows_still_stops_the_run(tmp_path, monkeypatch, capsys, sig, code):
    """The handler raises wherever the main thread is. Where that is code which catches the interrupt and
    goes on (Python only prints an exception raised in a finalizer, for one), the run still
    stops after the FedAvg local step (or the client) it is in, keeping the round's finished clients
    and that client's progress. Seen twice in 135 SIGTERMs sent
    during a cold torch.compile: the run went on to its last round and exited 0."""
    from baffle import cli, simulation
    real = simulation.client_update

    def work(engine, data, plan, algo, *rest):
        if plan.round == 1 and data.client == 2:
            try:
                signal.raise_signal(sig)  # runs the handler here, before raise_signal returns
            except KeyboardInterrupt:
                pass  # as library code that swallows it
        return real(engine, data, plan, algo, *rest)

    monkeypatch.setattr(simulation, "client_update", work)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    args = [f"{cli._flag(k)}={v}" for k, v in MIDWAY.items()]
    assert cli.main(["run", *args, "--mode", "fedavg", "--engine", "loop", "--quiet", "--out", str(run)]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"baffle: interrupted; continue with: baffle run --resume {run}"
    assert len(metrics(run)) == 1  # round 2 did not finish
    kept = torch.load(run / runs.PARTIAL, weights_only=True)
    assert sorted(kept["replies"]) == [0, 1] and (kept["progress"]["client"], kept["progress"]["step"]) == (2, 1)
    # the command gives back the signal handlers it found
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_background_job_that_ignores_ctrl_c_still_ignores_it(tmp_path):
    """A script's ``baffle run ... &`` starts with SIGINT ignored: a Ctrl-C meant for the foreground job
    must not stop it; SIGTERM does."""
    run = tmp_path / "run"
    proc = subprocess.Popen([*BAFFLE, "run", *SMALL, "--rounds", "400", "--out", str(run), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 120
    wait_until((run / "checkpoint.pt").exists, deadline)

    def rounds():  # the run may be writing its next line
        return (run / "metrics.jsonl").read_bytes().count(b"\n")

    proc.send_signal(signal.SIGINT)
    at_sigint = rounds()
    wait_until(lambda: proc.poll() is not None or rounds() >= at_sigint + 4, deadline)
    assert proc.poll() is None, "SIGINT stopped a run that was started with it ignored"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err


def test_a_run_directory_in_use_is_refused_and_left_intact(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([*BAFFLE, "run", *SMALL, "--rounds", "400", "--out", str(run), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until((run / "checkpoint.pt").exists, time.time() + 120)
        second = baffle("run", "--resume", run, check=False)
        assert proc.poll() is None, "the first run ended before the second one tried"
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"baffle: error: run directory {run} is in use by another baffle process (pid {proc.pid}); "
            "wait for it to end or stop it first"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    # the refused process wrote nothing: the first run's rounds are all there, in order
    rounds = [r["round"] for r in metrics(run)]
    assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) < 400
    with runs.locked(run):  # the lock went with the first process (a resume then works as tested above)
        pass


def test_a_new_run_never_starts_in_a_directory_filled_meanwhile(tmp_path):
    run = tmp_path / "run"
    baffle("run", *SMALL, "--rounds", "2", "--out", run)
    def files():  # the lock file (which names its last holder) aside
        return {p.name: p.read_bytes() for p in run.iterdir() if p.name != runs.LOCK}

    before = files()
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    # as if another process had filled it between this one's check and its start
    with pytest.raises(ConfigError, match=f"run directory {run} already exists and is not empty"):
        runs.execute(config, run)
    assert files() == before and "metrics.jsonl" in before


@pytest.mark.parametrize("args,needle", [
    (["--bogus", "1"], "--bogus"),
    (["--sigma", "-1"], "sigma must be > 0, got -1.0"),
    (["--sigma", "0"], "sigma must be > 0, got 0.0"),
    (["--num-perturbations", "0"], "num_perturbations must be >= 1, got 0"),
    (["--alpha", "0"], "alpha must be > 0, got 0.0"),
    (["--client-fraction", "1.5"], "client_fraction must be in (0, 1], got 1.5"),
    (["--client-fraction", "0"], "client_fraction must be in (0, 1], got 0.0"),
    (["--num-clients", "5000"], "more clients (5000) than training examples (2000)"),
    (["--num-perturbations", "ten"], "num_perturbations must be int, got 'ten'"),
    (["--server-weight-decay", "-0.1"], "server_weight_decay must be a finite number >= 0, got -0.1"),
    (["--mode", "fedavg", "--client-weight-decay", "nan"], "client_weight_decay must be a finite number >= 0, got nan"),
    (["--client-weight-decay", "0.001"], "client_weight_decay acts on FedAvg's local steps; with mode fedsgd"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--model", "vgg"], "unknown model 'vgg'"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, needle):
    run = tmp_path / "run"
    out = baffle("run", "--dataset", "synthetic", *args, "--out", run, check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert not run.exists()


def test_corrupt_dataset_and_bad_out_are_named(tmp_path):
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"not a pickle")
    run = tmp_path / "run"
    out = baffle("run", "--dataset", "cifar10", "--data-root", tmp_path, "--out", run, check=False)
    assert out.returncode == 2 and "data_batch_1" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not run.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = baffle("run", "--dataset", "synthetic", "--out", a_file, check=False)
    assert out.returncode == 2 and "not a directory" in out.stderr
    out = baffle("run", "--resume", tmp_path, "--out", run, check=False)
    assert out.returncode == 2 and "--out cannot be combined with --resume" in out.stderr


def test_resume_with_another_configuration_is_refused(tmp_path):
    run = tmp_path / "run"
    baffle("run", *SMALL, "--rounds", "2", "--out", run)
    before = (run / "metrics.jsonl").read_text()
    out = baffle("run", "--resume", run, *SMALL, "--rounds", "2", "--sigma", "0.001", check=False)
    assert out.returncode == 2 and "sigma" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (run / "metrics.jsonl").read_text() == before
    # --threads is this process's resource, not the experiment's: a resume may change it
    stored = (run / "config.json").read_text()
    baffle("run", "--resume", run, "--threads", "1")
    assert (run / "config.json").read_text() == stored and (run / "metrics.jsonl").read_text() == before
    out = baffle("run", "--resume", run, "--threads", "0", check=False)
    assert out.returncode == 2 and "threads" in out.stderr
    # ... also where the run's preset is no longer known (renamed or removed since)
    config = json.loads(stored)
    (run / "config.json").write_text(json.dumps(config | {"preset": "renamed-since"}))
    baffle("run", "--resume", run, "--threads", "1")
    assert (run / "metrics.jsonl").read_text() == before
    # ... and options restated without a preset are compared with the stored values, not the preset's
    baffle("run", "--resume", run, "--rounds", "2", "--dataset", "synthetic")
    assert (run / "metrics.jsonl").read_text() == before
    out = baffle("run", "--resume", run, "--rounds", "3", check=False)
    assert out.returncode == 2 and out.stderr.strip().endswith("rounds = 2 there, 3 now"), out.stderr
    # a hand-edited null in a text field is named, not read as the text "None"
    (run / "config.json").write_text(json.dumps(config | {"preset": None}))
    out = baffle("run", "--resume", run, check=False)
    assert out.returncode == 2 and "preset must be str, got None" in out.stderr, out.stderr
    (run / "config.json").write_text(stored)
    out = baffle("run", "--resume", tmp_path / "missing", check=False)
    assert out.returncode == 2 and "config.json" in out.stderr
    out = baffle("run", *SMALL, "--out", run, check=False)  # not over an existing run
    assert out.returncode == 2 and "already exists" in out.stderr


def test_presets_listed_and_all_valid():
    out = baffle("presets")
    names = preset_names()
    assert {"quick", "table1-lenet-mnist-k100", "table1-lenet-mnist-k200", "table1-lenet-mnist-k500",
            "table1-wrn-mnist-k100", "table1-wrn-mnist-k200", "table1-wrn-mnist-k500",
            "table1-lenet-mnist-bp", "table1-wrn-mnist-bp"} <= set(names)
    for name in names:
        assert name in out.stdout
        resolve(name, {})  # validates every value
        assert load_preset(name)["description"]


def test_a_preset_extends_another_with_only_what_differs(tmp_path, monkeypatch):
    base, relu = load_preset("table1-lenet-mnist-k100"), load_preset("ablation-lenet-mnist-k100-relu")
    differs = {k for k in base.keys() | relu.keys() if base.get(k) != relu.get(k)}
    assert differs == {"activation", "description", "preset"} and relu["activation"] == "relu"
    monkeypatch.setattr(config_module, "PRESET_DIR", tmp_path)
    for name, values in {"a": {"extends": "b", "description": "A"}, "b": {"extends": "a", "description": "B"},
                         "c": {"extends": "nowhere", "description": "C"}, "d": {"extends": 3, "description": "D"},
                         "e": {"extends": "f", "description": "E", "rounds": 2},
                         "f": {"description": "F", "rounds": 1, "seed": 7}, "g": {"extends": "f"}}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(values))
    assert load_preset("e") == {"description": "E", "rounds": 2, "seed": 7, "preset": "e"}
    for name, message in [("a", "preset 'a': extends goes round in a circle: a -> b -> a"),
                          ("c", "preset 'c' extends 'nowhere' (see `baffle presets`: a, b, c, d, e, f, g)"),
                          ("g", "preset 'g' extends 'f' but has no description of its own"),
                          ("d", "preset 'd': extends must name a preset, got 3")]:
        with pytest.raises(ConfigError) as e:
            load_preset(name)
        assert str(e.value) == message


def test_table1_presets_match_the_paper():
    for model in ("lenet", "wrn"):
        for k in (100, 200, 500):
            c = resolve(f"table1-{model}-mnist-k{k}", {})
            assert (c.num_perturbations, c.num_clients, c.partition, c.mode, c.rounds) == (k, 10, "iid", "fedavg", 20)
            assert (c.client_optimizer, c.client_lr, c.beta1, c.beta2) == ("adam", 0.01, 0.9, 0.99)
            assert c.activation == "hardswish" and c.ema_decay > 0 and c.method == "baffle"
            assert (c.batch_size, c.local_epochs, c.sigma, c.scheme) == (32, 1, 1e-4, "forward")
            assert c.norm == ("none" if model == "lenet" else "group")
            assert c.model == ("lenet" if model == "lenet" else "wrn-10-2")
        assert resolve(f"table1-{model}-mnist-bp", {}).method == "backprop"


def test_the_deviation_preset_changes_only_the_client_lr():
    paper, ours = resolve("table1-wrn-mnist-k100", {}).to_dict(), resolve("deviation-wrn-mnist-k100-lr0.001", {}).to_dict()
    assert {k for k in paper if paper[k] != ours[k]} == {"client_lr", "description", "preset"}
    assert (paper["client_lr"], ours["client_lr"]) == (0.01, 0.001)


def test_help_lists_options():
    out = baffle("run", "--help")
    for flag in ("--preset", "--out", "--resume", "--num-perturbations", "--sigma", "--mode", "--partition"):
        assert flag in out.stdout


def test_secure_aggregation_options():
    c = resolve("quick", {"secure_aggregation": "true", "secagg_fraction_bits": "16"})
    assert c.secure_options().config(10).fraction_bits == 16
    assert resolve("quick", {}).secure_options() is None
    with pytest.raises(ValueError, match="threshold"):
        resolve("quick", {"secure_aggregation": "1", "secagg_threshold": "11"})
    out = baffle("run", "--help")
    assert "--secure-aggregation" in out.stdout
