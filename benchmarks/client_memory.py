"""Client memory for one round of work, each client kind in its own process.

    .venv/bin/python benchmarks/client_memory.py            # table + chart + memory caps (~10 min)
    .venv/bin/python benchmarks/client_memory.py --no-caps  # table + chart only

Kinds (one FedSGD round of client work on one batch; LeNet and WRN-10-2 at B=32, 64):
    bp          torch, one backpropagation step (forward, backward, SGD update): the baseline
    bp-ckpt     the same with activation checkpointing (torch.utils.checkpoint, every stage)
    baffle      torch BAFFLE client: K forward passes at W + sigma z_k, bounded-memory probe
                (eager loop engine, 8 directions per block), no autograd graph
    baffle-onnx ONNX Runtime + NumPy BAFFLE client (baffle.edge.OnnxClient), no torch imported

Each child reports its resident set after importing its runtime (the baseline:
Python, NumPy and torch or onnxruntime, plus baffle's modules; for bp-ckpt also
torch._dynamo, which checkpoint imports on first use), then resets the kernel's
high-water mark (/proc/self/clear_refs) and reports the peak resident set (VmHWM)
over the round: increment = peak - baseline. This first round pays the runtime's
lazy initialisation (oneDNN kernels and scratch space on the first convolution,
ONNX Runtime's session); a second round is then measured the same way above the
resident set before it ("warm round": the working memory of the algorithm itself). The client's weights and
batch are read from .npy files (its local dataset is not counted). One thread
everywhere (a weak device); glibc tuned for a small footprint in every child alike
(MALLOC_ARENA_MAX=1, MALLOC_MMAP_THRESHOLD_=131072: see CHILD_ENV).

Memory caps: the smallest RLIMIT_AS (address-space limit, enforced by the kernel;
cgroups are read-only on this machine) under which each kind finishes its round,
found by bisection to 4 MiB. Address space counts mapped libraries and reserved
thread stacks, so these limits are far above the resident figures; what matters
is the ordering at the same model and batch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KINDS = ("bp", "bp-ckpt", "baffle", "baffle-onnx")
MODELS = {"lenet": "none", "wrn-10-2": "group"}  # the Table 1 presets' norms
BATCHES = (32, 64)
K, SIGMA = 100, 1e-4
# glibc: one arena, and a fixed mmap threshold (setting it turns off the dynamic one, which
# otherwise moves ~1 MiB buffers onto the heap after their first free, where interleaved
# allocations fragment it: the ONNX client on WRN then peaked anywhere from 104 to 221 MiB
# over five identical runs; with the fixed threshold, 86 MiB every time)
CHILD_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
PROBE_BLOCK = 8  # directions held at once by the torch BAFFLE client (the library default)
PAPER = "the paper (Feng et al. 2023, Table 4): a BAFFLE client needs about 10% of backpropagation's memory"


def status(field: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM, VmPeak, VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


# ---- child: one client kind, one round -----------------------------------------------

def child(kind: str, model: str, work: Path) -> dict:
    import numpy as np

    if kind == "baffle-onnx":
        import onnxruntime  # noqa: F401  (part of the runtime's baseline; OnnxClient imports it lazily)

        from baffle.edge import OnnxClient
        from baffle.plan import ProbePlan
    else:
        import torch
        import torch.nn.functional as F
        from torch.utils.checkpoint import checkpoint

        from baffle.engine import Engine
        from baffle.estimators import ProbePlan, probe_blocks
        from baffle.flatmodel import FlatModel
        from baffle.models import ModelSpec, build_model

        if kind == "bp-ckpt":
            import torch._dynamo  # noqa: F401  (checkpoint(use_reentrant=False) imports it on first use)
        torch.set_num_threads(1)
    baseline = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    t0 = time.perf_counter()
    w = np.load(work / "w.npy")
    x = np.load(work / "x.npy")
    y = np.load(work / "y.npy")
    plan = ProbePlan(12345, K, SIGMA)
    if kind == "baffle-onnx":
        client = OnnxClient(work / "model.onnx", threads=1)

        def round_of_work() -> float:
            return float(client.probe(w, x, y, plan).u[0])
    else:
        net = build_model(ModelSpec(model, norm=MODELS[model]))
        xt, yt, wt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w)
        if kind == "baffle":
            flat = FlatModel(net)
            engine = Engine(flat, "loop", block=PROBE_BLOCK)
            seg = torch.zeros(len(yt), dtype=torch.int64)

            def round_of_work() -> float:
                r = probe_blocks(lambda v: engine.losses(v, xt, yt, seg, 1),
                                 lambda v, z, s: engine.perturbed_losses(v, z, s, xt, yt, seg, 1),
                                 wt, plan, PROBE_BLOCK)
                return float(r.u[0, 0])
        else:
            stages = _stages(net)

            def forward(inp):
                if kind == "bp":
                    return net(inp)
                for stage in stages[:-1]:
                    inp = checkpoint(stage, inp, use_reentrant=False)
                return stages[-1](inp)

            def round_of_work() -> float:
                with torch.no_grad():
                    torch.nn.utils.vector_to_parameters(wt, net.parameters())
                net.zero_grad(set_to_none=True)
                loss = F.cross_entropy(forward(xt), yt)
                loss.backward()
                with torch.no_grad():  # plain SGD by hand: torch.optim's first step imports torch._dynamo
                    for param in net.parameters():
                        param.sub_(param.grad, alpha=0.01)
                return float(loss)
    check = round_of_work()
    peak, seconds = status("VmHWM"), time.perf_counter() - t0
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    round_of_work()
    warm = status("VmHWM") - before
    return {"kind": kind, "model": model, "batch": int(len(y)), "baseline_mb": round(baseline, 1),
            "peak_mb": round(peak, 1), "warm_round_mb": round(warm, 1), "vm_peak_mb": round(status("VmPeak"), 1),
            "seconds": round(seconds, 3), "check": check}


def _stages(net):
    """Checkpointed stages: every top-level stage of the feature extractor, classifier last."""
    from torch import nn

    if hasattr(net, "blocks"):  # WRN: stem, each residual block, head + classifier
        return [net.stem, *net.blocks, nn.Sequential(net.head, net.classifier)]
    convs = list(net.features)  # LeNet: (conv, norm, act, pool) x 2, then pool + flatten
    return [nn.Sequential(*convs[:4]), nn.Sequential(*convs[4:8]), nn.Sequential(*convs[8:], net.classifier)]


# ---- parent ------------------------------------------------------------------------------

def prepare(model: str, batch: int, root: Path) -> Path:
    import numpy as np
    import torch

    from baffle.data import load_dataset
    from baffle.edge.export import export_onnx
    from baffle.flatmodel import FlatModel
    from baffle.models import ModelSpec, build_model

    work = root / f"{model}-b{batch}"
    work.mkdir(parents=True, exist_ok=True)
    net = build_model(ModelSpec(model, norm=MODELS[model]), generator=torch.Generator().manual_seed(0))
    np.save(work / "w.npy", FlatModel(net).weights().numpy())
    (work / "model.onnx").write_bytes(export_onnx(net, (1, 28, 28)))
    train, _ = load_dataset("mnist")
    np.save(work / "x.npy", train.x[:batch].numpy())
    np.save(work / "y.npy", train.y[:batch].numpy())
    return work


def spawn(kind: str, model: str, work: Path, limit_mb: float | None = None) -> dict | None:
    env = {**os.environ, **CHILD_ENV}

    def cap():
        if limit_mb is not None:
            lim = int(limit_mb * 2**20)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    out = subprocess.run([sys.executable, __file__, "--child", kind, model, str(work)], capture_output=True,
                         text=True, env=env, preexec_fn=cap, timeout=600)
    if out.returncode != 0:
        if limit_mb is None:
            raise RuntimeError(f"{kind} {model}: {out.stderr.strip()[-500:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def smallest_limit(kind: str, model: str, work: Path, hi: float) -> float:
    """Smallest RLIMIT_AS (MiB, to 4 MiB) under which the round finishes."""
    while spawn(kind, model, work, hi) is None:
        hi *= 1.5
    lo = 64.0
    while hi - lo > 4:
        mid = (lo + hi) / 2
        if spawn(kind, model, work, mid) is None:
            lo = mid
        else:
            hi = mid
    return hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--no-caps", action="store_true", help="skip the RLIMIT_AS bisection")
    args = p.parse_args()
    if args.child:
        kind, model, work = args.child
        print(json.dumps(child(kind, model, Path(work))))
        return
    rows, caps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for batch in BATCHES:
                work = prepare(model, batch, Path(tmp))
                group = {kind: spawn(kind, model, work) for kind in KINDS}
                bp_inc = group["bp"]["peak_mb"] - group["bp"]["baseline_mb"]
                for kind, r in group.items():
                    r["increment_mb"] = round(r["peak_mb"] - r["baseline_mb"], 1)
                    r["increment_vs_bp"] = round(r["increment_mb"] / bp_inc, 3)
                    rows.append(r)
                    print(f"{model:9s} B={batch:<3d} {kind:12s} baseline {r['baseline_mb']:7.1f}  peak "
                          f"{r['peak_mb']:7.1f}  increment {r['increment_mb']:6.1f} MiB "
                          f"({100 * r['increment_vs_bp']:.0f}% of bp)  warm round {r['warm_round_mb']:6.1f}",
                          flush=True)
                if not args.no_caps and batch == 64:
                    for kind, r in group.items():
                        limit = smallest_limit(kind, model, work, r["vm_peak_mb"] + 64)
                        caps.append({"kind": kind, "model": model, "batch": batch, "smallest_as_limit_mb": limit})
                        print(f"  smallest RLIMIT_AS {kind:12s} {limit:7.0f} MiB", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = render(rows, caps)
    (RESULTS / "client_memory.txt").write_text(table)
    (RESULTS / "client_memory.json").write_text(json.dumps({"rows": rows, "caps": caps, "k": K}, indent=1) + "\n")
    chart(rows, RESULTS / "client_memory.png")
    print(table)


def render(rows: list[dict], caps: list[dict]) -> str:
    lines = [f"Client memory, one FedSGD round (K={K} for BAFFLE), 1 thread, MiB (resident).",
             "| model | B | client | runtime baseline | peak | increment | increment / bp's | warm round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['kind']} | {r['baseline_mb']:.1f} | {r['peak_mb']:.1f} | "
                     f"{r['increment_mb']:.1f} | {100 * r['increment_vs_bp']:.0f}% | {r['warm_round_mb']:.1f} |")
    lines.append(f"Beside {PAPER}.")
    if caps:
        lines += ["", "Smallest address-space limit (RLIMIT_AS) under which the round finishes, MiB:",
                  "| model | B | client | smallest RLIMIT_AS |", "|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['batch']} | {c['kind']} | {c['smallest_as_limit_mb']:.0f} |" for c in caps]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda c: (list(MODELS).index(c[0]), c[1]))
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.6), sharey=False)
    for ax, (model, batch) in zip(axes, cases):
        group = {r["kind"]: r for r in rows if (r["model"], r["batch"]) == (model, batch)}
        base = [group[k]["baseline_mb"] for k in KINDS]
        inc = [group[k]["increment_mb"] for k in KINDS]
        ax.bar(KINDS, base, color="0.8", label="runtime baseline")
        ax.bar(KINDS, inc, bottom=base, color="tab:blue", label="round increment")
        ax.set_title(f"{model}, B={batch}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    axes[0].set_ylabel("peak resident memory (MiB)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Client peak memory for one round (paper Table 4: BAFFLE ~10% of BP)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
