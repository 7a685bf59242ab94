"""Engine benchmark: perturbed-loss throughput against this machine's GEMM roof.

One command, one run, every ratio measured in it:

    .venv/bin/python benchmarks/engine.py [--threads 2] [--quick]

Prints tables and writes benchmarks/results/engine-<device>.json:
  1. GEMM roof (GFLOP/s of a 2048^3 float32 matmul, same threads).
  2. LeNet and WRN-10-2 at batch 32/64/256/320 (320 = the 10 clients of a FedSGD
     round at 32 each, batched): plain forward, backprop step, and each
     engine (loop, compiled, vmap): ms per perturbation, multiple of one plain
     forward, GFLOP/s, fraction of the roof, peak-RSS increment (each cell in its
     own process, after a warm-up call (and any compilation): freed memory returned
     with malloc_trim, peak RSS reset via /proc/self/clear_refs, then the increment
     of the peak over the live RSS; engines also count their block of directions,
     block x n x 4 bytes, generated before the reset).
  3. Direction generation per direction (eager / compiled) and its share of a
     FedSGD round at the paper's K.
  4. A FedSGD round at the paper's settings (LeNet, no norm, Hardswish, K=100, batch
     32 per client, 10 clients): (a) the official code's naive loop, (b) the
     simulator with the chosen engine, same threads: the ratio b/a.
  5. Projected wall time of the paper's Table 1 MNIST LeNet runs (K=100/200/500,
     20 rounds, epoch level, batch 32) from measured per-step costs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baffle.engine import ENGINES, Engine
from baffle.flatmodel import FlatModel
from baffle.models import ModelSpec, build_model
from baffle.perturb_torch import CompiledDirections, flat_directions

SPECS = {"lenet": ModelSpec("lenet"), "wrn-10-2": ModelSpec("wrn-10-2", norm="group")}
RESULTS = Path(__file__).parent / "results"


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) / 1024


def reset_peak() -> float:
    """Return freed heap memory to the OS (malloc_trim), reset this process's peak RSS
    (Linux clear_refs 5) and return the current RSS: the live memory before a call."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS:")


def peak_mb() -> float:
    return _status_mb("VmHWM:")


def timed(fn, min_seconds: float = 1.0, min_reps: int = 3) -> float:
    """Seconds per call: two warm-ups, then repeat until min_seconds and min_reps."""
    fn()
    fn()
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_seconds:
        fn()
        reps += 1
    return (time.perf_counter() - t0) / reps


def gemm_roof(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, 2.0) / 1e9


def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs (2 x multiply-adds) of the convolutions and linear layers of one forward."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            total += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            total += 2 * out.numel() * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return float(total)


def cell(model_name: str, batch: int, method: str, block: int) -> dict:
    """One measurement, run in a fresh process (for a clean peak-RSS reading)."""
    model = FlatModel(build_model(SPECS[model_name], generator=torch.Generator().manual_seed(0)))
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    seg = torch.zeros(batch, dtype=torch.int64)
    w = model.weights()
    z = flat_directions(1, torch.arange(block), model.n)
    if method == "forward":
        def fn():
            with torch.no_grad():
                F.cross_entropy(model.module(x), y).item()
        per = 1
    elif method == "backprop":
        def fn():
            model.grad(w, x, y)
        per = 1
    else:
        engine = Engine(model, method)
        def fn():
            engine.perturbed_losses(w, z, 1e-4, x, y, seg, 1)
        per = block
    fn()  # compile / warm up before the peak is reset: steady-state memory only
    base = reset_peak()
    sec = timed(fn) / per
    extra = z.numel() * 4 / 2**20 if per > 1 else 0.0  # a probe also holds its block of directions
    return {"seconds": sec, "rss_increment_mb": peak_mb() - base + extra}


def run_cell(model_name: str, batch: int, method: str, block: int, threads: int) -> dict:
    code = (f"import torch, json, sys; torch.set_num_threads({threads}); sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"import engine as b; print(json.dumps(b.cell({model_name!r}, {batch}, {method!r}, {block})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def naive_fedsgd_round(model: torch.nn.Module, batches, k: int, sigma: float, seed: int) -> None:
    """The official BAFFLE code's shape: per client, per k, torch.randn per parameter
    (re-seeded per k), add in place, one forward at batch 32, subtract in place."""
    params = [p for p in model.parameters()]
    with torch.no_grad():
        for x, y in batches:
            base = F.cross_entropy(model(x), y).item()
            diffs = []
            for i in range(k):
                gen = torch.Generator().manual_seed(seed * 100003 + i)
                noise = [torch.randn(p.shape, generator=gen) * sigma for p in params]
                for p, e in zip(params, noise):
                    p.add_(e)
                diffs.append(F.cross_entropy(model(x), y).item() - base)
                for p, e in zip(params, noise):
                    p.sub_(e)


def main() -> None:
    ap = argparse.ArgumentParser(description="engine benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="batch 32 only, fewer cells")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"device": f"CPU {platform.machine()} ({os.cpu_count()} cores)", "threads": args.threads,
                    "torch": torch.__version__, "block": args.block}
    roof = gemm_roof()
    report["gemm_roof_gflops"] = roof
    print(f"device: {report['device']}, threads {args.threads}, torch {torch.__version__}")
    print(f"GEMM roof (2048^3 float32 matmul): {roof:.1f} GFLOP/s\n")

    # 2. per-model, per-batch, per-method
    batches = (32,) if args.quick else (32, 64, 256, 320)  # 320 = 10 clients x 32 batched
    rows = []
    print(f"{'model':9s} {'batch':>5s} {'method':9s} {'ms/pert':>8s} {'x fwd':>6s} {'GFLOP/s':>8s} {'roof':>5s} {'+RSS MB':>8s}")
    for name, spec in SPECS.items():
        module = build_model(spec, generator=torch.Generator().manual_seed(0))
        for batch in batches:
            flops = forward_flops(module, torch.randn(batch, 1, 28, 28))
            fwd = None
            for method in ("forward", "backprop", *ENGINES):
                r = run_cell(name, batch, method, args.block, args.threads)
                fwd = fwd or r["seconds"]
                gflops = flops / r["seconds"] / 1e9 if method != "backprop" else 3 * flops / r["seconds"] / 1e9
                row = {"model": name, "batch": batch, "method": method, "ms": 1e3 * r["seconds"],
                       "x_forward": r["seconds"] / fwd, "gflops": gflops, "roof_fraction": gflops / roof,
                       "rss_increment_mb": r["rss_increment_mb"], "forward_gflop": flops / 1e9}
                rows.append(row)
                print(f"{name:9s} {batch:5d} {method:9s} {row['ms']:8.2f} {row['x_forward']:6.2f} "
                      f"{gflops:8.1f} {row['roof_fraction']:5.0%} {row['rss_increment_mb']:8.1f}", flush=True)
    report["methods"] = rows
    print("(backprop GFLOP/s counts 3x the forward FLOPs)\n")

    # 3. direction generation
    gen = {}
    for name, spec in SPECS.items():
        n = sum(p.numel() for p in build_model(spec, generator=torch.Generator().manual_seed(0)).parameters())
        eager = timed(lambda: flat_directions(3, torch.arange(args.block), n)) / args.block
        comp_fn = CompiledDirections(args.block)
        comp = timed(lambda: comp_fn(3, torch.arange(args.block), n)) / args.block
        gen[name] = {"n": n, "eager_ms": 1e3 * eager, "compiled_ms": 1e3 * comp}
        print(f"directions {name:9s} n={n:7d}: {1e3 * eager:.3f} ms eager, {1e3 * comp:.3f} ms compiled per direction")
    report["generation"] = gen
    print("share of direction generation (compiled) in a round, from this run's timings:")
    for name in SPECS:
        # FedSGD: generated by the (batched) clients' probe and again by the server's combine;
        # FedAvg: once per direction (probe and local update share the block)
        for batch, times, where in ((320, 2, "FedSGD, 10 clients x 32 batched"), (32, 1, "FedAvg local step, batch 32")):
            cells = [r for r in rows if r["model"] == name and r["batch"] == batch and r["method"] == "compiled"]
            if cells:
                g_ms = times * gen[name]["compiled_ms"]
                share = g_ms / (g_ms + cells[0]["ms"])
                gen[name][f"share_batch_{batch}"] = share
                print(f"  {name:9s} {where:32s}: {100 * share:4.1f}%")

    # 4. FedSGD round at the paper's settings: naive vs engine
    from baffle.data import make_synthetic
    from baffle.modes import Algorithm
    from baffle.server import ServerOptions
    from baffle.simulation import Simulator

    train, test = make_synthetic(n_train=3200, n_test=100, seed=0)
    clients = [train.subset(np.arange(i * 320, (i + 1) * 320)) for i in range(10)]
    lenet = SPECS["lenet"]
    naive_model = build_model(lenet, generator=torch.Generator().manual_seed(0))
    client_batches = [(c.x[:32], c.y[:32]) for c in clients]
    naive = timed(lambda: naive_fedsgd_round(naive_model, client_batches, 100, 1e-4, 1), 3.0, 1)
    algo = Algorithm(mode="fedsgd", num_perturbations=100, batch_size=32, probe_block=args.block)
    fed = {"naive_seconds": naive}
    print(f"\nFedSGD round, LeNet K=100, 10 clients x batch 32 (same {args.threads} threads):")
    print(f"  (a) naive official-style loop        {naive:7.3f} s")
    for engine_name, per_forward in (("loop", 1), ("loop", 10), ("compiled", 10)):
        sim = Simulator(build_model(lenet, generator=torch.Generator().manual_seed(0)), clients, test, algo,
                        ServerOptions(), seed=0, clients_per_forward=per_forward, engine=engine_name)
        sec = timed(lambda: sim.step(evaluate=False), 3.0, 2)
        key = f"{engine_name}_clients_per_forward_{per_forward}"
        fed[key] = sec
        share = 100 * 2 * (gen["lenet"]["compiled_ms" if engine_name == "compiled" else "eager_ms"]) * 100 / 1e3 / sec
        print(f"  (b) engine={engine_name:8s} clients/forward={per_forward:2d} {sec:7.3f} s   b/a = {sec / naive:.2f}"
              f"   (direction generation ~{share:.1f}% of the round)")
    report["fedsgd_round"] = fed

    # 5. Table 1 projection: epoch level, 10 clients x 6000 examples, batch 32 -> 187 steps/client/round
    best = min((r for r in rows if r["model"] == "lenet" and r["batch"] == 32 and r["method"] in ENGINES),
               key=lambda r: r["ms"])
    steps = 10 * (6000 // 32) * 20
    proj = {}
    print(f"\nProjected Table 1 MNIST LeNet (20 rounds, {steps} client steps; engine {best['method']}, "
          f"{best['ms']:.2f} ms/perturbation + one generation per direction):")
    gen_ms = gen["lenet"]["compiled_ms" if best["method"] == "compiled" else "eager_ms"]
    for k in (100, 200, 500):  # a local step generates each direction once (probe and update share it)
        per_step = (k + 1) * best["ms"] / 1e3 + k * gen_ms / 1e3
        proj[k] = steps * per_step
        print(f"  K={k:3d}: {steps * per_step / 3600:6.2f} h")
    report["table1_projection_seconds"] = proj
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "engine-cpu.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
