"""``baffle report``: run directories -> a markdown report with tables and plots.

    baffle report RUN_DIR... --out docs/results/

For each run it keeps config.json, metrics.jsonl, summary.json (when the run
finished), checkpoint.pt and round.partial.pt (while it has not) and notes.md
(when someone wrote one) under OUT/runs/<name>/, so the report can be rebuilt
from the repository alone (``baffle report docs/results/runs/* --out docs/results``)
and a partial run resumed from its kept copy on another machine. It writes OUT/README.md, one section per preset family
(Table 1, ablations, Figure 2, non-iid: our accuracy beside the paper's, cited by
table and row, and PNG plots of test accuracy against rounds and against client
forward passes, OUT/<family>_{rounds,forward_passes}.png), then the forward passes
needed to first reach the paper's MNIST LeNet accuracies.
A run that has not finished is reported as partial, with the rounds it has done;
nothing is extrapolated.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, read_json_object, resolve
from .paper import LENET_MNIST_TARGETS, PAPER, PAPER_K500_BUDGET, PAPER_K500_FORWARD_PASSES
from .plots import figure, png
from .runs import (CHECKPOINT, CONFIG, METRICS, PARTIAL, SUMMARY, atomic_write, evaluated_rows, parse_metrics,
                   read_metrics)


@dataclass(frozen=True)
class Run:
    name: str
    config: dict
    metrics: list[dict]
    finished: bool

    @property
    def evaluated(self) -> list[dict]:
        return evaluated_rows(self.metrics)

    @property
    def last_evaluated(self) -> dict | None:
        evaluated = self.evaluated
        return evaluated[-1] if evaluated else None

    @property
    def rounds(self) -> int:
        return self.metrics[-1]["round"] if self.metrics else 0


def load_run(path: Path) -> Run:
    """A run directory's config and metrics (raises ConfigError naming what is missing)."""
    config = read_json_object(path / CONFIG, f"cannot read run directory {path}")
    metrics = read_metrics(path / METRICS, upto=10**12)
    return Run(path.resolve().name, config, metrics, _finished(config, metrics, (path / SUMMARY).is_file()))


def _finished(config: dict, metrics: list[dict], summary: bool) -> bool:
    """A run has finished when it wrote its summary and logged its last round."""
    return summary and bool(metrics) and metrics[-1]["round"] == config.get("rounds")


#: An optional hand-written note kept beside a run (what ran it, pauses, what we found).
NOTES = "notes.md"

#: Report sections: a preset family (the preset name's first word) and its heading.
SECTIONS = {
    "table1": "Table 1: MNIST, 10 iid clients, 20 epochs of each client's data (fedavg: 20 rounds)",
    "ablation": "Table 1 ablations: MNIST LeNet, K=100 setting",
    "fig2": "Figure 2: batch level (FedSGD), accuracy against rounds and forward passes",
    "noniid": "Label non-iid (Dirichlet partition), MNIST LeNet",
    "reach": "Beyond the paper: fewer forward passes for MNIST LeNet (Table 1 protocol, other K)",
    "deviation": "Deviations from the paper's stated settings, to find where a shortfall comes from",
    "other": "Other runs",
}


def section_of(run: Run) -> str:
    family = str(run.config.get("preset") or "").split("-")[0]
    return family if family in SECTIONS else "other"


def _keep(path: Path, out: Path, name: str) -> str | None:
    """Copy the run's small files into OUT/runs/<name>/ (atomically; a no-op on itself).

    An unfinished run's checkpoint.pt (and round.partial.pt, the clients done in its
    unfinished round and the progress of the one running) is kept too, so the kept copy
    is itself a run directory that ``baffle run --resume`` continues on any machine; a
    finished run's copy holds neither, and an unfinished one's no summary.json. "Finished"
    is decided as in the report (load_run), on the bytes read here.

    The checkpoint is read before metrics.jsonl: a run appends a round's metric line
    before it replaces its checkpoint, so the lines read always cover the checkpoint
    read (lines past it are dropped on resume). The copy is written in the other order,
    config and metrics before the checkpoint (and a finished run's summary before an
    older copy's checkpoint is removed), so a copy interrupted midway (Ctrl-C, a full
    disk) still holds every line of its checkpoint's rounds, and never its metrics with
    neither a checkpoint nor a summary (a resume would start over). A partial round that
    is not the checkpoint's next is ignored on resume.

    notes.md is nobody's state but its author's: the run's note seeds the kept copy,
    but a kept note is never overwritten (a run resumed from a copy of the kept
    directory carries an older note). Returns a warning when the two notes differ.
    """
    dest = out / "runs" / name
    if dest.resolve() == path.resolve():
        return None
    data: dict[str, bytes | None] = {}
    for file in (CHECKPOINT, PARTIAL, CONFIG, METRICS, SUMMARY):
        try:  # a running run may remove its partial round between the test and the read
            data[file] = (path / file).read_bytes()
        except FileNotFoundError:
            data[file] = None
    config = json.loads(data[CONFIG] or b"{}")
    metrics = parse_metrics((data[METRICS] or b"").decode(), upto=10**12)
    if _finished(config, metrics, data[SUMMARY] is not None):
        order = (CONFIG, METRICS, SUMMARY, CHECKPOINT, PARTIAL)  # never metrics with neither summary nor checkpoint
        data[CHECKPOINT] = data[PARTIAL] = None
    else:  # a summary left over beside fewer rounds must not make the copy look finished
        order = (SUMMARY, CONFIG, METRICS, CHECKPOINT, PARTIAL)
        data[SUMMARY] = None
    dest.mkdir(parents=True, exist_ok=True)
    for file in order:
        if data[file] is not None:
            atomic_write(dest / file, data[file])
        elif (dest / file).exists():
            (dest / file).unlink()  # an older copy's summary or checkpoint must not outlive the run's state
    if not (path / NOTES).is_file():
        return None
    if not (dest / NOTES).is_file():
        atomic_write(dest / NOTES, (path / NOTES).read_bytes())
    elif (dest / NOTES).read_bytes() != (path / NOTES).read_bytes():
        return f"kept {dest / NOTES}, which differs from {path / NOTES}: edit the kept one"
    return None


def first_reaching(run: Run, top1_percent: float) -> dict | None:
    """The first evaluated round at or above ``top1_percent``, or None."""
    return next((m for m in run.evaluated if 100 * m["test_top1"] >= top1_percent - 1e-9), None)


def build_report(paths: list[Path], out: Path) -> Path:
    """Write OUT/README.md and the plots from the run directories ``paths``; return the report path."""
    if not paths:
        raise ConfigError("give at least one run directory")
    names = []
    for path in paths:
        name = load_run(path).name  # checks the directory before anything is written
        if name in names:
            raise ConfigError(f"two run directories named {name!r} ({path}); their copies would collide")
        names.append(name)
    out.mkdir(parents=True, exist_ok=True)
    for path, name in zip(paths, names):
        if warning := _keep(path, out, name):
            print(f"baffle report: {warning}", file=sys.stderr)
    # the report is made from the kept copies, so a round a live run adds meanwhile cannot make them disagree
    runs = [load_run(out / "runs" / name) for name in names]
    notes = {run.name: (out / "runs" / run.name / NOTES) for run in runs}
    notes = {name: f.read_text().strip() for name, f in notes.items() if f.is_file()}
    sections = _sections(runs)
    for section, group in sections:
        atomic_write(out / f"{section}_rounds.png", _plot(group, "round", "communication rounds"))
        atomic_write(out / f"{section}_forward_passes.png",
                     _plot(group, "passes", "client passes (forward, + backward for backprop)"))
    for section in SECTIONS.keys() - {s for s, _ in sections}:  # plots of an earlier report, now unlinked
        for plot in ("rounds", "forward_passes"):
            (out / f"{section}_{plot}.png").unlink(missing_ok=True)
    report = out / "README.md"
    atomic_write(report, render(runs, notes).encode())
    return report


def _sections(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by section, sections in SECTIONS order, runs by name (not by the shell's glob order)."""
    return [(s, group) for s in SECTIONS
            if (group := sorted((r for r in runs if section_of(r) == s), key=lambda r: r.name))]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render(runs: list[Run], notes: dict[str, str] | None = None) -> str:
    notes = notes or {}
    lines = [
        "# baffle results",
        "",
        f"Generated by `baffle report` on {time.strftime('%Y-%m-%d')} from {len(runs)} run directories "
        "(their config.json, metrics.jsonl, summary.json and notes.md are kept in `runs/`; rebuild with "
        "`baffle report docs/results/runs/* --out docs/results`; a partial run's copy also holds its "
        "checkpoint.pt, and round.partial.pt with the clients done in its unfinished round (and the progress of "
        "the one running), so `baffle run "
        "--resume` continues it from a copy of that directory). "
        "Paper values: Feng et al., *Does Federated Learning Really Need Backpropagation?*, arXiv 2301.12195, "
        "cited by table and row. A partial run has not finished: its numbers are those of the rounds done, "
        "not a forecast. Wall times are elapsed time on the machine that ran the run, contention with other "
        "jobs included (a run's notes say when); the time between a stop and its resume is not counted. "
        "They are not compute times.",
    ]
    sections = _sections(runs)
    for section, group in sections:
        lines += ["", f"## {SECTIONS[section]}", "", *_accuracy_table(group), "",
                  f"![test accuracy against rounds]({section}_rounds.png)", "",
                  f"![test accuracy against forward passes]({section}_forward_passes.png)"]
        for run in group:
            if run.name in notes:
                lines += ["", f"**{run.name}**: {notes[run.name]}"]
    lines += ["", *_reach_table([run for _, group in sections for run in group]), ""]  # in section order
    return "\n".join(lines)


def _accuracy_table(runs: list[Run]) -> list[str]:
    lines = ["| run | setting | rounds done | last evaluated top-1 | best top-1 | paper | ours - paper | forward passes "
             "| wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        c, last, seen = run.config, run.metrics[-1] if run.metrics else {}, run.last_evaluated
        final = seen["test_top1"] if seen else None
        at = f" (round {seen['round']})" if seen and seen["round"] != run.rounds else ""
        best = max((m["test_top1"] for m in run.evaluated), default=None)
        cell = PAPER.get(run.config.get("preset", ""))
        paper = f"{cell.top1:.2f}% ({cell.where})" if cell else "-"
        changed = _changed_from_preset(c)
        diff = "-"
        if cell and final is not None:
            diff = f"{100 * final - cell.top1:+.2f}" + ("" if run.finished else " (partial)")
            if changed:
                diff = "- (not the preset's setting)"
        done = f"{run.rounds}/{c.get('rounds', '?')}" + ("" if run.finished else " (partial)")
        lines.append(f"| {run.name} | {setting(c, changed)} | {done} | {_pct(final)}{at} | {_pct(best)} | {paper} | {diff} | "
                     f"{last.get('forward_passes', 0):.3g} | {last.get('wall_seconds', 0) / 3600:.2f} h |")
    return lines


def setting(c: dict, changed: dict) -> str:
    """The experiment in one cell: what a reader needs to tell two rows apart, and ``changed``, what differs
    from the preset (:func:`_changed_from_preset`)."""
    baffle = c.get("method") == "baffle"
    parts = [f"{c.get('model')} {c.get('dataset')}, {c.get('method')} {c.get('mode')}"]
    if baffle:
        parts.append(f"K={c.get('num_perturbations')}" + (f" {c.get('scheme')}" if c.get("scheme") != "forward" else ""))
    parts.append(f"{c.get('num_clients')} {c.get('partition')} clients"
                 + (f" (alpha {c.get('alpha')})" if c.get("partition") == "dirichlet" else ""))
    if c.get("mode") == "fedavg":
        parts.append(f"client {c.get('client_optimizer')} {c.get('client_lr')}")
    parts.append(f"server {c.get('server_optimizer')} {c.get('server_lr')}"
                 + (f" {c.get('lr_schedule')}" if c.get("lr_schedule", "constant") != "constant" else ""))
    for key, label in (("client_weight_decay", "client weight decay"), ("server_weight_decay", "server weight decay")):
        if c.get(key):
            parts.append(f"{label} {c.get(key)}")
    parts.append(f"{c.get('activation')}, EMA {c.get('ema_decay')}")
    if changed:
        parts.append("**differs from the preset as it is now: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + "**")
    return ", ".join(parts)


#: Fields that say how a run was executed, not what was computed.
RUNTIME_FIELDS = frozenset({"threads", "engine", "probe_block", "clients_per_forward", "reply_timeout", "min_replies",
                            "description", "preset", "train_eval_size", "eval_every", "data_root", "onnx_model"})


def _changed_from_preset(c: dict) -> dict:
    """The experiment's fields whose value differs from the preset the run names (none if it names no preset)."""
    try:
        preset = resolve(str(c.get("preset")), {}).to_dict()
    except ConfigError:
        return {}
    return {k: v for k, v in c.items() if k not in RUNTIME_FIELDS and k in preset and preset[k] != v}


def _reach_table(runs: list[Run]) -> list[str]:
    lines = ["## Forward passes to first reach the paper's MNIST LeNet accuracies", "",
             f"Client forward passes (each on one batch) up to the first evaluated round at or above each of "
             f"Table 1's MNIST LeNet accuracies, and their share of the paper's K=500 run counted on our split "
             f"({PAPER_K500_FORWARD_PASSES:.3g} passes: {PAPER_K500_BUDGET}; the authors' code keeps 5,000 "
             f"training images for validation, which would make it about 9% fewer). The goal: "
             f"{LENET_MNIST_TARGETS[-1]:.2f}% within one fifth of it ({PAPER_K500_FORWARD_PASSES / 5:.3g}). "
             f"A run that evaluates every n rounds is seen only every n rounds.", "",
             "| run | " + " | ".join(f"{t:.2f}%" for t in LENET_MNIST_TARGETS) + " |",
             "|---|" + "---|" * len(LENET_MNIST_TARGETS)]
    for run in runs:
        if (run.config.get("model"), run.config.get("dataset")) != ("lenet", "mnist"):
            continue
        cells, last = [], run.last_evaluated
        unreached = (f"not reached by round {last['round']} (last evaluated)" if last else "no round evaluated yet") \
            + ("" if run.finished else ", partial")
        for t in LENET_MNIST_TARGETS:
            m = first_reaching(run, t)
            if m is None:
                cells.append(unreached)
                continue
            backward = f" + {m['backward_passes']:.3g} backward" if m.get("backward_passes") else ""
            cells.append(f"{m['forward_passes']:.3g} ({100 * m['forward_passes'] / PAPER_K500_FORWARD_PASSES:.3g}%)"
                         f"{backward}, round {m['round']}, {m['wall_seconds'] / 60:.1f} min")
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return lines


def _plot(runs: list[Run], x: str, label: str) -> bytes:
    fig, ax = figure(1, (7, 4.2))
    drawn = False  # a run started but not yet evaluated has no point: a log axis needs one
    for run in runs:
        ev = run.evaluated
        xs = [m["forward_passes"] + m.get("backward_passes", 0) if x == "passes" else m[x] for m in ev]
        drawn = drawn or any(v > 0 for v in xs)
        ax.plot(xs, [100 * m["test_top1"] for m in ev], marker=".",
                label=run.name + ("" if run.finished else " (partial)"))
    for t in LENET_MNIST_TARGETS:
        ax.axhline(t, color="0.7", lw=0.8, ls="--")
    planned = [r.config.get("rounds") or 1 for r in runs]
    if drawn and (x == "passes" or max(planned) > 10 * min(planned)):  # 20 FedAvg rounds beside 3740 FedSGD
        ax.set_xscale("log")
    ax.set(xlabel=label, ylabel="test top-1 (%)", title=f"test accuracy against {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png(fig, dpi=110)


__all__ = ["build_report", "load_run", "render", "first_reaching", "section_of", "Run", "SECTIONS"]
