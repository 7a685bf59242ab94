"""Seconds per FedSGD round at the paper's LeNet settings, measured in one run.

    K = 100, batch 32 per client, 10 clients, LeNet (no norm, Hardswish), MNIST.

Rows: the simulator evaluating clients one by one (--clients-per-forward 1) and
batched (all 10 clients of the round in one forward per perturbation), plus the
plain forward and backprop-step costs that bound them. Prints a table and writes
benchmarks/results/fedsgd_round.json.

    .venv/bin/python benchmarks/fedsgd_round.py [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baffle.data import load_dataset, partition
from baffle.models import ModelSpec, build_model
from baffle.modes import Algorithm
from baffle.server import ServerOptions
from baffle.simulation import Simulator


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fedsgd_round.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_dataset("mnist")
    parts = partition(train.y.numpy(), 10, "iid", np.random.default_rng(0))
    clients = [train.subset(p) for p in parts]
    algo = Algorithm(mode="fedsgd", num_perturbations=100, batch_size=32)
    rows = []

    model = build_model(ModelSpec("lenet"), generator=torch.Generator().manual_seed(0))
    x, y = train.x[:32], train.y[:32]
    with torch.no_grad():
        fwd = timed(lambda: F.cross_entropy(model(x), y).item(), 50)

    def bp():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    rows.append(("plain forward, batch 32", fwd, 1.0))
    rows.append(("backprop step, batch 32", timed(bp, 50), None))
    for per_forward in (1, 10):
        sim = Simulator(build_model(ModelSpec("lenet"), generator=torch.Generator().manual_seed(0)), clients, test,
                        algo, ServerOptions("adam", 0.01), seed=0, clients_per_forward=per_forward)
        sec = timed(lambda: sim.step(evaluate=False), args.rounds)
        rows.append((f"FedSGD round, clients_per_forward={per_forward}", sec, None))
    ideal = 10 * 101 * fwd
    print(f"device: CPU ({platform.processor() or platform.machine()}), threads {args.threads}, torch {torch.__version__}")
    print(f"{'what':45s} {'seconds':>10s} {'x 1010 fwd':>11s}")
    result = []
    for name, sec, _ in rows:
        ratio = sec / ideal if name.startswith("FedSGD") else None
        print(f"{name:45s} {sec:10.4f} {'' if ratio is None else f'{ratio:11.2f}'}")
        result.append({"what": name, "seconds": sec, "multiple_of_1010_forwards": ratio})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": result}, indent=2))


if __name__ == "__main__":
    main()
