"""The run directory: config, metrics, checkpoints, summary, plot and weights.

    config.json        the fully resolved RunConfig
    metrics.jsonl      one line per round (RoundRecord + wall_seconds)
    checkpoint.pt      state after the last finished round (for --resume)
    round.partial.pt   replies of the clients done so far in the unfinished round (and a
                       FedAvg client's progress within its local steps)
    summary.json       final and best accuracy, totals, wall time, peak memory (over resumes)
    curves.png         accuracy and loss per round
    model.safetensors  the final evaluated weights (the EMA when it is on)

Every file but metrics.jsonl is written atomically (temporary file, fsync,
rename); metrics.jsonl gets one fsynced line per round, before the checkpoint.
On resume it is cut back to the checkpointed rounds (a torn or extra last line
is dropped), so a run killed at any instant resumes from its last checkpoint
and, being deterministic, ends with the same metrics as an uninterrupted run.
wall_seconds is real elapsed time of the run (I/O included), summed over resumes.

A round whose clients take long (WRN-10-2 BAFFLE on a CPU: hours a round) keeps
its progress in round.partial.pt: the replies of the clients done so far, written
atomically after a client's reply (or a group's, computed together) once
``partial_every`` seconds (PARTIAL_EVERY_S) have passed since the round started or
the file was last written, and when the run is stopped (Ctrl-C; SIGTERM in the CLI).
An in-process FedAvg client's local steps (a WRN-10-2 K=500 client: 25 min on a 2-core
CPU) are kept the same way: after a local step, once ``partial_every`` seconds have
passed, the file also holds that client's progress (weights, optimiser moments, counts;
see modes.ClientProgress), so a run killed mid-client loses at most that interval and
one step of it. A resume runs only the round's other clients, continuing the one in
progress from its step; the file is removed once the round's checkpoint is written, and
ignored if it belongs to another round than the checkpoint's next.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import ConfigError, RunConfig, read_json_object
from .data import DataError, label_summary, load_dataset, partition
from .models import ModelSpec, build_model
from .modes import TAG_INIT, TAG_DATA, ClientProgress, ClientStats, Upload
from .perturb import derive_seed
from .simulation import Simulator

CONFIG, METRICS, CHECKPOINT, SUMMARY = "config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"
PARTIAL = "round.partial.pt"
PARTIAL_EVERY_S = 60.0  # at most one partial-round write a minute: cheap next to the rounds it saves
LOCK = ".baffle.lock"
PLOT, WEIGHTS = "curves.png", "model.safetensors"


_UMASK = os.umask(0)  # read once: os.umask can only be read by setting it
os.umask(_UMASK)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give run files the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class Setup:
    """What a run needs, built from its config before anything is written."""

    simulator: Simulator
    label_summary: str
    notes: tuple[str, ...] = ()  # things the user should know before the first round


def build_model_for(config: RunConfig, example_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """The run's initial model (seeded from the run seed) for inputs of ``example_shape``."""
    spec = ModelSpec(config.model, in_channels=example_shape[0], num_classes=num_classes,
                     image_size=example_shape[-1], norm=config.norm, activation=config.activation)
    try:
        gen = torch.Generator().manual_seed(derive_seed(config.seed, TAG_INIT) >> 1)
        return build_model(spec, generator=gen)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def onnx_model_bytes(config: RunConfig, model: torch.nn.Module, example_shape: tuple[int, ...]) -> bytes:
    """The ONNX model the run's edge clients load: ``onnx_model`` or a fresh export."""
    if config.onnx_model is None:
        try:
            from .edge.export import export_onnx

            return export_onnx(model, example_shape)
        except Exception as e:  # missing onnx/onnxscript, or a model the exporter cannot trace
            raise ConfigError(f"cannot export the model to ONNX for the onnx clients ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
    path = Path(config.onnx_model)
    if not path.is_file():
        raise ConfigError(f"onnx_model {config.onnx_model!r} is not a file")
    return path.read_bytes()


def client_partitions(config: RunConfig):
    """(train, test, parts): the dataset and each client's example indices, seeded by the run.

    The server and every client (in process or on a Flower node) call this with the
    same config and get the same partition."""
    train, test = load_dataset(config.dataset, config.data_root, seed=config.seed)
    if config.num_clients > len(train):
        raise ConfigError(f"more clients ({config.num_clients}) than training examples ({len(train)})")
    rng = np.random.default_rng(derive_seed(config.seed, TAG_DATA))
    parts = partition(train.y.numpy(), config.num_clients, config.partition, rng, alpha=config.alpha,
                      shards_per_client=config.shards_per_client, min_size=config.min_client_size)
    return train, test, parts


def build(config: RunConfig) -> Setup:
    """Data, partition, model and simulator for ``config`` (raises DataError/ConfigError)."""
    train, test, parts = client_partitions(config)
    labels = train.y.numpy()
    shape = tuple(train.x.shape[1:])
    model = build_model_for(config, shape, train.num_classes)
    edge, notes = {}, []
    if config.onnx_clients:
        from .edge import OnnxClient

        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError("onnx_clients need onnxruntime (pip install 'baffle[onnx]')") from None
        client = OnnxClient(onnx_model_bytes(config, model, shape), threads=1)
        if client.refusal and config.onnx_clients == config.num_clients:
            raise ConfigError(f"every client is an ONNX client and would refuse every round: {client.refusal}")
        edge = {c: client for c in range(config.onnx_clients)}  # stateless: one session serves them all
        notes.append(f"clients 0..{config.onnx_clients - 1} run ONNX Runtime + NumPy (no torch)")
        if client.refusal:
            notes.append(f"the ONNX clients will refuse every round: {client.refusal}")
    sim = Simulator(model, [train.subset(p) for p in parts], test, config.algorithm(), config.server_options(),
                    client_fraction=config.client_fraction, seed=config.seed,
                    train_eval_size=config.train_eval_size, clients_per_forward=config.clients_per_forward,
                    engine=config.compute_engine(), secure=config.secure_options(), edge_clients=edge,
                    min_replies=config.min_replies)
    return Setup(sim, label_summary(labels, parts, train.num_classes), tuple(notes))


def read_metrics(path: Path, upto: int) -> list[dict]:
    """Metric lines of rounds 1..upto (lines past the checkpoint are dropped)."""
    return parse_metrics(path.read_text(), upto) if path.exists() else []


def parse_metrics(text: str, upto: int) -> list[dict]:
    """The lines of a metrics.jsonl's ``text`` up to round ``upto`` (a torn last line ends them)."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("round", upto + 1) > upto:
            break
        rows.append(row)
    return rows


def evaluated_rows(metrics: list[dict]) -> list[dict]:
    """The metric rows of rounds whose test set was evaluated (test_top1 not None)."""
    return [m for m in metrics if m.get("test_top1") is not None]


def check_resumable(out: Path, config: RunConfig | None = None) -> RunConfig:
    """The stored config of run directory ``out``; ``config`` (if given) must match it,
    and its checkpoint and metrics must be fit to continue (see read_checkpoint)."""
    values = read_json_object(out / CONFIG, f"cannot resume {out}")
    stored = RunConfig.from_dict(values, source=str(out / CONFIG)).validate()
    if config is not None:
        check_restated(out, stored, config)
    read_checkpoint(out)
    return stored


def check_restated(out: Path, stored: RunConfig, config: RunConfig) -> None:
    """A resume that restates its configuration (``config``) must restate ``stored`` exactly."""
    if config != stored:
        a, b = stored.to_dict(), config.to_dict()
        diff = next(k for k in a if a[k] != b[k])
        raise ConfigError(f"resume directory {out} was made with another configuration: "
                          f"{diff} = {a[diff]!r} there, {b[diff]!r} now")


def read_checkpoint(out: Path) -> tuple[dict, list[dict]] | None:
    """Run directory ``out``'s checkpoint and the metric lines of its rounds, or None when
    it has no checkpoint (a run stopped in its first round). Refused (ConfigError): a
    finished run without its checkpoint (a report's kept copy: it would train again from
    round 1 over its finished metrics), a file that is no baffle checkpoint, and metrics
    that lack a checkpointed round (a summary and curves over it would misstate the run).
    The state's wall_seconds and peak_rss_mb (0.0 where absent) come back as floats."""
    if not (out / CHECKPOINT).exists():
        if (out / SUMMARY).exists():
            raise ConfigError(f"cannot resume {out}: the run has finished ({SUMMARY}) and holds no {CHECKPOINT}")
        return None
    try:
        state = torch.load(out / CHECKPOINT, weights_only=True)
        rounds = int(state["simulator"]["round"])
        state["wall_seconds"] = float(state["wall_seconds"])
        state["peak_rss_mb"] = float(state.get("peak_rss_mb", 0.0))  # absent in checkpoints before 2026-12-03
    except Exception as e:  # corrupt or foreign file: name it, do not execute it
        raise ConfigError(f"cannot resume {out}: {CHECKPOINT} is unreadable or not a baffle checkpoint "
                          f"({type(e).__name__})") from None
    metrics = read_metrics(out / METRICS, rounds)
    gap = next((r for r, row in enumerate(metrics, 1) if row.get("round") != r), len(metrics) + 1)
    if gap <= rounds:
        raise ConfigError(f"cannot resume {out}: {METRICS} has no line for round {gap} in its place, "
                          f"and {CHECKPOINT} is at round {rounds}")
    return state, metrics


def new_run_dir(config: RunConfig, out: Path | None) -> Path:
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{config.preset or 'run'}-{stamp}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.exists():
        check_unused(out)
    return out


def check_unused(out: Path) -> None:
    """A new run may only start in an empty directory (a stale lock file aside)."""
    if any(p.name != LOCK for p in out.iterdir()):
        raise ConfigError(f"run directory {out} already exists and is not empty (use --resume {out} or another --out)")


_HELD: dict[Path, tuple[int, int]] = {}  # run directories this process holds: (fd, depth)


@contextlib.contextmanager
def locked(out: Path):
    """Hold run directory ``out`` for this process alone while the block runs.

    Two processes training in one directory would both append to metrics.jsonl and
    overwrite each other's checkpoint; one's rewrite of metrics.jsonl on resume would
    send the other's later lines to a file no longer linked (lost rounds). The lock is
    an advisory flock, released by the kernel when the holder exits, even if killed.
    Re-entrant within a process (the CLI takes it before building a resumed run, the
    Flower ServerApp thread again in ``execute``): it is let go when the last block ends.
    """
    key = out.resolve()
    if key not in _HELD:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)  # os.open applies the umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"run directory {out} is in use by another baffle process (pid {holder}); "
                              "wait for it to end or stop it first") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = (fd, 0)
    fd, depth = _HELD[key]
    _HELD[key] = (fd, depth + 1)
    try:
        yield
    finally:
        fd, depth = _HELD[key]
        if depth > 1:
            _HELD[key] = (fd, depth - 1)
        else:
            del _HELD[key]
            os.close(fd)


def execute(
    config: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    setup: Setup | None = None,
    on_round: Callable[[dict], None] | None = None,
    partial_every: float = PARTIAL_EVERY_S,
    stop: Callable[[], None] | None = None,
) -> dict:
    """Run (or resume) ``config`` in directory ``out``; return the summary.

    ``stop()`` is called after each batch of clients and each round; a KeyboardInterrupt it raises stops
    the run there as Ctrl-C does, keeping the round's finished clients (the CLI's signal handlers use it).
    """
    setup = setup or build(config)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        # checked again under the lock: another process may have started a run here since
        if not resume:
            check_unused(out)
        return _execute(config, out, resume, setup, on_round, partial_every, stop or (lambda: None))


class PartialRound:
    """The replies of the current round's clients so far, and the progress of the FedAvg
    client running now as last snapshotted, kept in round.partial.pt."""

    def __init__(self, path: Path, every: float):
        self.path, self.every = path, every

    def resume(self, round_: int) -> tuple[dict, float | None, ClientProgress | None]:
        """(replies, wall_seconds, progress) kept for round ``round_`` (0-based), or ({}, None, None).

        A progress of a client that has since replied is never run (the simulator skips replied
        clients) nor written again (save() drops it)."""
        if not self.path.exists():
            return {}, None, None
        try:
            state = torch.load(self.path, weights_only=True)
            if int(state["round"]) != round_:
                return {}, None, None
            replies = {int(c): r if isinstance(r, str) else (Upload(int(c), round_, r[0]), ClientStats(*r[1:]))
                       for c, r in state["replies"].items()}
            wall = float(state["wall_seconds"])
            kept = state.get("progress")  # files written before progress was kept have none
            progress = None if kept is None else ClientProgress(**kept)
            if progress is not None and progress.round != round_:
                raise ValueError(f"progress of round {progress.round + 1} in round {round_ + 1}'s file")
        except Exception as e:  # corrupt or foreign file: name it, do not execute it
            raise ConfigError(f"cannot resume {self.path.parent}: {PARTIAL} is unreadable "
                              f"({type(e).__name__}); delete it to redo round {round_ + 1} from its start") from None
        return replies, wall, progress

    def start(self, round_: int, done: dict, progress: ClientProgress | None = None) -> None:
        """Round ``round_`` (0-based) begins, its clients in ``done`` already replied, and
        ``progress`` (a client's, not in ``done``) kept from before."""
        self.round, self.replies, self.progress, self.saved = round_, dict(done), progress, time.perf_counter()

    def add(self, replies: dict, wall_seconds: float) -> None:
        """Note a batch of replies; write the file if ``every`` seconds have passed since the last write."""
        self.replies.update(replies)
        if time.perf_counter() - self.saved >= self.every:
            self.save(wall_seconds)

    def step(self, snapshot: Callable[[], ClientProgress], wall_seconds: float, now: bool = False) -> None:
        """A client finished a local step: take its ``snapshot()`` and write the file, if
        ``every`` seconds have passed since the last write or ``now`` (a snapshot copies the
        client's weights and optimiser state, so it is taken only when written)."""
        if now or time.perf_counter() - self.saved >= self.every:
            self.progress = snapshot()
            self.save(wall_seconds)

    def save(self, wall_seconds: float) -> None:
        """Write the replies noted so far, and the last progress of a client that has not replied
        (none of either: nothing to keep, no file)."""
        progress = self.progress if self.progress is not None and self.progress.client not in self.replies else None
        if not self.replies and progress is None:
            return
        encoded = {c: r if isinstance(r, str) else (r[0].vector.clone(), r[1].forward_passes, r[1].backward_passes,
                                                     r[1].train_loss)
                   for c, r in self.replies.items()}
        progress = None if progress is None else dict(vars(progress))
        buf = io.BytesIO()
        torch.save({"round": self.round, "replies": encoded, "wall_seconds": wall_seconds, "progress": progress}, buf)
        atomic_write(self.path, buf.getvalue())
        self.saved = time.perf_counter()

    def finished(self) -> None:
        self.path.unlink(missing_ok=True)


def _execute(config: RunConfig, out: Path, resume: bool, setup: Setup,
             on_round: Callable[[dict], None] | None, partial_every: float, stop: Callable[[], None]) -> dict:
    sim = setup.simulator
    metrics: list[dict] = []
    wall = 0.0
    ckpt = out / CHECKPOINT
    peak = 0.0  # MB; the largest peak RSS recorded in this run's checkpoints
    loaded = read_checkpoint(out) if resume else None
    if loaded:
        state, metrics = loaded
        try:
            sim.load_state_dict(state["simulator"])
        except Exception as e:  # another model's checkpoint: name it, do not execute it
            raise ConfigError(f"cannot resume {out}: {CHECKPOINT} does not fit this run's model "
                              f"({type(e).__name__})") from None
        wall, peak = state["wall_seconds"], state["peak_rss_mb"]  # floats: read_checkpoint parsed them
    else:
        write_json(out / CONFIG, config.to_dict())
    partial = PartialRound(out / PARTIAL, partial_every)
    done, partial_wall, progress = partial.resume(sim.round) if resume else ({}, None, None)
    wall = partial_wall if partial_wall is not None else wall
    # metrics.jsonl holds exactly the checkpointed rounds before new lines are appended
    atomic_write(out / METRICS, "".join(json.dumps(r) + "\n" for r in metrics).encode())
    for row in metrics:
        if on_round:
            on_round(row)
    started = time.perf_counter() - wall

    def replied(batch: dict) -> None:
        partial.add(batch, time.perf_counter() - started)
        stop()

    def stepped(snapshot: Callable[[], ClientProgress]) -> None:
        partial.step(snapshot, time.perf_counter() - started)
        try:
            stop()
        except KeyboardInterrupt:  # a stop asked for mid-step: keep the client as of this whole step
            partial.step(snapshot, time.perf_counter() - started, now=True)
            raise

    with open(out / METRICS, "a") as log:
        while sim.round < config.rounds:
            last = sim.round + 1 == config.rounds
            partial.start(sim.round, done, progress)
            try:
                record = sim.step(evaluate=last or (sim.round + 1) % config.eval_every == 0, done=done,
                                  on_replies=replied, progress=progress, on_step=stepped)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep every finished client, not only the last save's
                partial.save(time.perf_counter() - started)
                raise
            done, progress = {}, None
            row = {**record.to_dict(), "wall_seconds": round(time.perf_counter() - started, 3)}
            metrics.append(row)
            log.write(json.dumps(row) + "\n")  # a torn last line is dropped on resume
            log.flush()
            os.fsync(log.fileno())
            buf = io.BytesIO()
            peak = max(peak, peak_rss_mb())
            torch.save({"simulator": sim.state_dict(), "wall_seconds": time.perf_counter() - started,
                        "peak_rss_mb": peak}, buf)
            atomic_write(ckpt, buf.getvalue())
            partial.finished()
            if on_round:
                on_round(row)
            stop()
    return finish(out, config, sim, metrics, peak)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (ru_maxrss is in KiB on Linux): process-wide, so it
    includes earlier runs made in the same process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finish(out: Path, config: RunConfig, sim: Simulator, metrics: list[dict], peak_mb: float = 0.0) -> dict:
    """Write the weights, summary.json and curves; ``peak_mb``: the largest peak RSS in the run's checkpoints."""
    from safetensors.torch import save

    from .plots import plot_curves

    w = sim.server.eval_weights()
    atomic_write(out / WEIGHTS, save({k: v.contiguous().clone() for k, v in sim.model.named(w).items()},
                                     metadata={"preset": config.preset, "ema": str(config.ema_decay > 0)}))
    best = max(evaluated_rows(metrics), key=lambda m: m["test_top1"])
    final = metrics[-1]
    summary = {
        "run_dir": str(out),
        "preset": config.preset,
        "rounds": final["round"],
        "final_test_top1": final["test_top1"],
        "final_test_top5": final["test_top5"],
        "final_test_loss": final["test_loss"],
        "best_test_top1": best["test_top1"],
        "best_round": best["round"],
        "uplink_bytes_total": sum(m["uplink_bytes"] for m in metrics),
        "downlink_bytes_total": sum(m["downlink_bytes"] for m in metrics),
        "uplink_bytes_per_client_round": round(sum(m["uplink_bytes"] / m["clients"] for m in metrics) / len(metrics), 1),
        "forward_passes_total": final["forward_passes"],
        "backward_passes_total": final["backward_passes"],
        "parameters": sim.n,
        "wall_seconds": final["wall_seconds"],
        "peak_rss_mb": round(max(peak_mb, peak_rss_mb()), 1),
    }
    write_json(out / SUMMARY, summary)
    atomic_write(out / PLOT, plot_curves(metrics, title=config.preset or "baffle run"))
    return summary


__all__ = ["DataError", "ConfigError", "Setup", "build", "execute", "check_resumable", "check_restated", "new_run_dir", "atomic_write"]
