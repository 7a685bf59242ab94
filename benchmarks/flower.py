"""In-process simulator vs Flower simulation vs Flower deployment: same run, three engines.

    .venv/bin/python benchmarks/flower.py [--rounds 10] [--clients 4] [--secure]

One config (preset table1-lenet-mnist-k100, i.e. the paper's MNIST LeNet epoch-level
BAFFLE, cut to K=20 and 25 local steps a round so that a round takes seconds;
``--clients`` iid clients, clients_per_forward 1, the eager loop engine, evaluated
every round, same seed) run three ways, one after the other on this machine:
  1. in process     ``baffle run --engine loop``
  2. Flower sim     ``baffle run --engine flower`` (Ray backend, one virtual SuperNode per client)
  3. Flower deploy  flower-superlink + one flower-supernode per client on loopback, ``flwr run``
and, with ``--secure``, all three again with secure aggregation.
For each: final and per-round test accuracy (agreement with the in-process run),
seconds per round (median, from metrics.jsonl), the first round, and start-up (wall
from launching the command to the first round's start: total wall - the rounds).
Prints a table; writes benchmarks/results/flower.{txt,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baffle.flower.local import LocalDeployment
from baffle.flower.task import OFFLINE_ENV

RESULTS = Path(__file__).parent / "results"


PRESET = "table1-lenet-mnist-k100"


def options(args, secure: bool) -> dict:
    opts = {"dataset": args.dataset, "num-clients": args.clients, "rounds": args.rounds, "num-perturbations": 20,
            "local-steps": 25, "clients-per-forward": 1, "eval-every": 1, "threads": 2, "engine": "loop"}
    if secure:
        opts["secure-aggregation"] = "true"
    return opts


def summarise(name: str, run: Path, wall: float) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r["wall_seconds"] for r in rows]
    per_round = [b - a for a, b in zip(ends, ends[1:])]
    return {"engine": name, "final_top1": rows[-1]["test_top1"], "top1": [r["test_top1"] for r in rows],
            "test_loss": [r["test_loss"] for r in rows], "seconds_per_round": statistics.median(per_round),
            "first_round_s": ends[0], "startup_s": wall - ends[-1], "wall_s": wall,
            "rejected": sum(len(r["rejected"]) for r in rows)}


def baffle_run(name: str, engine: str, opts: dict, out: Path) -> dict:
    opts = {**opts, "engine": engine}
    cmd = [sys.executable, "-m", "baffle.cli", "run", "--preset", PRESET, "--out", str(out), "--quiet",
           *[x for k, v in opts.items() for x in (f"--{k}", str(v))]]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **OFFLINE_ENV})
    return summarise(name, out, time.perf_counter() - t0)


def deploy_run(name: str, opts: dict, out: Path, home: Path, clients: int) -> dict:
    t0 = time.perf_counter()
    with LocalDeployment(nodes=clients, home=home) as fed:
        done = fed.run(out, " ".join(f"{k}={v}" for k, v in opts.items()), preset=PRESET)
    if done.returncode != 0:
        raise RuntimeError(f"flwr run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return summarise(name, out, time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--secure", action="store_true", help="also run both Flower engines with secure aggregation")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="baffle-flower-bench-"))
    plain = options(args, secure=False)
    results = [baffle_run("in process", "loop", plain, tmp / "inproc"),
               baffle_run("Flower simulation", "flower", plain, tmp / "sim"),
               deploy_run("Flower deployment", plain, tmp / "deploy", tmp / "home", args.clients)]
    if args.secure:
        secure = options(args, secure=True)
        results += [baffle_run("in process, secure", "loop", secure, tmp / "inproc-s"),
                    baffle_run("Flower simulation, secure", "flower", secure, tmp / "sim-s"),
                    deploy_run("Flower deployment, secure", secure, tmp / "deploy-s", tmp / "home-s", args.clients)]
    ref = {False: results[0], True: results[3] if args.secure else None}
    lines = [f"baffle on Flower: preset {PRESET} ({args.dataset}, LeNet, epoch-level BAFFLE) with K=20, 25 local "
             f"steps, {args.clients} clients, {args.rounds} rounds, clients_per_forward 1, loop engine, same seed",
             "", "| engine | final test acc | max |acc - in process| over rounds | s / round (median) | "
             "first round s | start-up s | total wall s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        base = ref["secure" in r["engine"]]
        diff = max(abs(a - b) for a, b in zip(r["top1"], base["top1"]))
        r["max_abs_top1_diff"] = diff
        lines.append(f"| {r['engine']} | {100 * r['final_top1']:.2f}% | {100 * diff:.2f} points | "
                     f"{r['seconds_per_round']:.2f} | {r['first_round_s']:.1f} | {r['startup_s']:.1f} | "
                     f"{r['wall_s']:.1f} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flower.txt").write_text(text + "\n")
    (RESULTS / "flower.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
