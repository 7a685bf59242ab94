"""How quantised secure aggregation affects convergence (one run, same seed).

Trains BAFFLE FedSGD on MNIST (LeNet, 10 iid clients, K=20, batch 8 per client,
server Adam with a cosine schedule: the `quick` preset, shortened) once with plain
aggregation and once with secure aggregation at each precision (fraction bits f).
Every secure round also computes the plain weighted sum of the very same uploads,
so the error of the aggregated vector is measured directly.

    .venv/bin/python benchmarks/secure_precision.py [--rounds 600] [--bits 4 8 16 24]

Writes benchmarks/results/secure_precision.json and secure_precision.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from baffle.aggregation.options import SecureOptions
from baffle.config import resolve
from baffle.runs import build

RESULTS = Path(__file__).parent / "results"


class Measured:
    """SecureOptions.aggregate, plus the error against the plain sum of the same uploads."""

    def __init__(self, options: SecureOptions):
        self.options = options
        self.errors: list[np.ndarray] = []
        self.extra_bytes = 0.0

    def aggregate(self, clients, vectors, weights, round, seed):
        result = self.options.aggregate(clients, vectors, weights, round, seed)
        if not result.ok:
            return result
        plain = sum(w * v.double().numpy() for v, w in zip(vectors, weights))  # exact-ish float64 reference
        self.errors.append(np.abs(result.sum / result.weight - plain))
        return result


def run(rounds: int, bits: int | None, eval_every: int) -> dict:
    config = resolve("quick", {"rounds": rounds, "eval_every": eval_every})
    sim = build(config).simulator
    probe = Measured(SecureOptions(fraction_bits=bits)) if bits is not None else None
    sim.secure = probe
    curve, t0, extra = [], time.perf_counter(), 0
    for _ in range(rounds):
        evaluate = (sim.round + 1) % eval_every == 0 or sim.round + 1 == rounds
        record = sim.step(evaluate=evaluate)
        extra = max(extra, record.secure_extra_bytes)
        if evaluate:
            curve.append((record.round, record.test_top1))
    out = {"fraction_bits": bits, "final_top1": curve[-1][1], "curve": curve,
           "seconds": time.perf_counter() - t0, "secure_extra_bytes_per_client": extra}
    if probe is not None:
        err = np.concatenate(probe.errors)
        out.update(max_abs_error=float(err.max()), mean_abs_error=float(err.mean()),
                   bound=config.clients_per_round() * 2.0 ** -(bits + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="secure aggregation precision vs convergence")
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8, 16, 24])
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [run(args.rounds, bits, args.eval_every) for bits in [None, *args.bits]]
    print(f"{'aggregation':18s} {'final top-1':>11s} {'max |err|':>10s} {'mean |err|':>11s} "
          f"{'bound n2^-(f+1)':>15s} {'+bytes/client':>13s} {'seconds':>8s}")
    for r in rows:
        name = "plain" if r["fraction_bits"] is None else f"secure f={r['fraction_bits']}"
        if r["fraction_bits"] is None:
            print(f"{name:18s} {100 * r['final_top1']:10.2f}% {'':>10s} {'':>11s} {'':>15s} {0:13d} {r['seconds']:8.1f}")
        else:
            print(f"{name:18s} {100 * r['final_top1']:10.2f}% {r['max_abs_error']:10.2e} {r['mean_abs_error']:11.2e} "
                  f"{r['bound']:15.2e} {r['secure_extra_bytes_per_client']:13d} {r['seconds']:8.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secure_precision.json").write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, err) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        label = "plain" if r["fraction_bits"] is None else f"secure, f={r['fraction_bits']}"
        acc.plot(*zip(*[(t, 100 * a) for t, a in r["curve"]]), marker=".", label=label)
    acc.set(xlabel="round", ylabel="test top-1 (%)", title="MNIST LeNet, FedSGD K=20, same seed")
    acc.grid(alpha=0.3)
    acc.legend()
    secure = [r for r in rows if r["fraction_bits"] is not None]
    bits = [r["fraction_bits"] for r in secure]
    err.semilogy(bits, [r["max_abs_error"] for r in secure], marker="o", label="max |error|")
    err.semilogy(bits, [r["mean_abs_error"] for r in secure], marker="o", label="mean |error|")
    err.semilogy(bits, [r["bound"] for r in secure], ls="--", label="bound n 2^-(f+1)")
    err.set(xlabel="fraction bits f", ylabel="error of the aggregated u", title="aggregation error")
    err.grid(alpha=0.3)
    err.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "secure_precision.png", dpi=100)
    print(f"written {RESULTS / 'secure_precision.json'} and secure_precision.png")


if __name__ == "__main__":
    main()
