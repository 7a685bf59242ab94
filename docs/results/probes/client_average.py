"""Probe: each client's model against their average, from an unfinished FedAvg round.

A partial run directory holds the server weights W after the last finished round
(checkpoint.pt) and, in round.partial.pt, the model delta d_i of every client
finished in the next round. This evaluates on the test set the initial model W_0,
W, each W + d_i, and W + mean_i d_i (the FedAvg step with server SGD lr 1, if only
these clients had replied), and prints the deltas' norms and pairwise cosines, to
tell whether the clients learn alone and lose it in the average, or do not learn.

    .venv/bin/python docs/results/probes/client_average.py RUN_DIR [--clients 0,1] [--scales 0.1,0.2]

--clients keeps only those of the kept clients; --scales also evaluates W + s * mean_i d_i
for each s (a server step of lr s on the average).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from baffle.config import RunConfig
from baffle.data import load_dataset
from baffle.flatmodel import FlatModel
from baffle.runs import build_model_for

if __name__ == "__main__":
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, metavar="RUN_DIR")
    parser.add_argument("--clients", type=ints, default=None, help="comma-separated client ids (default: all kept)")
    parser.add_argument("--scales", type=floats, default=[], help="comma-separated server step sizes s for W + s * mean")
    args = parser.parse_args()
    run = args.run
    for name in ("config.json", "checkpoint.pt", "round.partial.pt"):
        if not (run / name).is_file():
            sys.exit(f"{run} has no {name}: the probe needs an unfinished round with clients kept")
    torch.set_num_threads(1)
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()), source=str(run))
    train, test = load_dataset(config.dataset, config.data_root, seed=config.seed)
    flat = FlatModel(build_model_for(config, tuple(train.x.shape[1:]), train.num_classes))
    w0 = flat.weights().clone()
    w = torch.load(run / "checkpoint.pt", weights_only=False)["simulator"]["server"]["w"]
    partial = torch.load(run / "round.partial.pt", weights_only=False)
    deltas = {c: r[0] for c, r in sorted(partial["replies"].items()) if not isinstance(r, str)}
    if args.clients is not None:
        wanted = set(args.clients)
        if wanted - set(deltas):
            sys.exit(f"client(s) {sorted(wanted - set(deltas))} not kept in {run}/round.partial.pt (kept: {sorted(deltas)})")
        deltas = {c: d for c, d in deltas.items() if c in wanted}
    if not deltas:
        sys.exit(f"{run}/round.partial.pt holds no client replies")
    mean = torch.stack(list(deltas.values())).mean(0)

    def show(label: str, v: torch.Tensor, extra: str = "") -> None:
        ev = flat.evaluate(v, test.x, test.y)
        print(f"| {label} | {100 * ev.top1:.2f}% | {ev.loss:.3f} | {extra} |", flush=True)

    print(f"round {partial['round'] + 1}, clients {sorted(deltas)}; |W| = {w.norm():.2f}, "
          f"|W - W_0| = {(w - w0).norm():.2f}\n")
    print("| weights | test top-1 | test loss | delta norm |\n|---|---|---|---|")
    show("W_0 (initial)", w0)
    show(f"W (after round {partial['round']})", w)
    for c, d in deltas.items():
        show(f"W + d_{c}", w + d, f"{d.norm():.2f}")
    show(f"W + mean of {len(deltas)} deltas", w + mean, f"{mean.norm():.2f}")
    for s in args.scales:
        show(f"W + {s:g} x mean of {len(deltas)} deltas", w + s * mean, f"{s * mean.norm():.2f}")
    ds = torch.stack([d / d.norm() for d in deltas.values()])
    cos = ds @ ds.T
    off = cos[~torch.eye(len(ds), dtype=torch.bool)]
    if off.numel():
        print(f"\npairwise cosines of the deltas: min {off.min():.3f}, mean {off.mean():.3f}, max {off.max():.3f}")
