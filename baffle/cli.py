"""The ``baffle`` command: ``baffle run``, ``baffle export-onnx``, ``baffle report``, ``baffle presets``.

The only layer that talks to the user: progress bar, summaries, one-line errors
(exit code 2 for bad input; 130 for Ctrl-C and 143 for SIGTERM, with the command that resumes).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, load_preset, preset_names, resolve
from .data import DataError

DEFAULT_PRESET = "quick"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler or service manager stopping the job): stops a run as Ctrl-C does.

    A job started in the background by a script ignores Ctrl-C's SIGINT, so ``kill`` is how it is stopped.
    Under ``--engine flower`` Ray installs its own SIGTERM handler: the run ends as if killed outright.
    """

    exit_code = 128 + signal.SIGTERM


_stops: list[type[KeyboardInterrupt]] = []  # the stops asked for since the command started


def _interrupt(signum, frame):
    """Ctrl-C or SIGTERM: raise at once, wherever the main thread is, and remember the stop.

    The raise can land in code that catches it and goes on (Python only prints an exception raised in a
    finalizer, for one; a SIGTERM sent during a cold torch.compile was lost, silently, twice in 135 tries).
    So the round loop also calls :func:`_stop_if_asked` between clients and rounds.
    """
    stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    _stops.append(stop)
    raise stop


def _stop_if_asked() -> None:
    if _stops:
        raise _stops[-1]


def _interrupted_code(e: KeyboardInterrupt) -> int:
    """The exit code of a stop: 143 for SIGTERM, 130 for Ctrl-C."""
    return e.exit_code if isinstance(e, Terminated) else 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(2, f"baffle: error: {message}\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="baffle", description="Backpropagation-free federated learning (BAFFLE).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a preset, with options overriding it",
                         description="Run a preset; every option below overrides the preset's value.")
    _preset_options(run)
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>-<time>)")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the run in DIR")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _run_options(run)
    export = sub.add_parser("export-onnx", help="export a preset's model to ONNX for inference-only clients",
                            description="Write the model of a preset (with the options below) as ONNX with its "
                                        "weights as the graph input 'w', for baffle.edge.OnnxClient.")
    _preset_options(export)
    export.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    _run_options(export)
    report = sub.add_parser("report", help="turn run directories into a markdown report with plots",
                            description="Write OUT/README.md (our accuracy beside the paper's, forward passes to "
                                        "reach its MNIST LeNet accuracies) and PNG plots; keep each run's small "
                                        "files under OUT/runs/ so the report can be rebuilt without re-running.")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, required=True, help="report directory (e.g. docs/results)")
    sub.add_parser("presets", help="list the presets")
    return p


def _preset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help=f"preset name (default {DEFAULT_PRESET}); one of: {', '.join(preset_names())}")


def _run_options(p: argparse.ArgumentParser) -> None:
    opts = p.add_argument_group("run options (override the preset)")
    defaults = RunConfig()
    for name, kind in RunConfig.field_types().items():
        if name in ("preset", "description"):
            continue
        extra = {"nargs": "?", "const": "true"} if kind is bool else {}  # --secure-aggregation alone = on
        opts.add_argument(_flag(name), dest=f"opt_{name}", type=str, default=None, metavar=kind.__name__.upper(),
                          help=f"(default {getattr(defaults, name)!r})", **extra)


def _overrides(args: argparse.Namespace) -> dict:
    """The run options given on the command line ("" unsets an optional one)."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    for name in RunConfig.optional_fields():
        if overrides.get(name) == "":
            overrides[name] = None
    if overrides.get("onnx_model"):  # stored absolute, so that --resume finds it from anywhere
        overrides["onnx_model"] = str(Path(overrides["onnx_model"]).absolute())
    return overrides


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export the model only: the dataset is read for its example shape and classes."""
    from . import runs
    from .data import load_dataset
    from .edge.export import export_onnx

    config = resolve(args.preset or DEFAULT_PRESET, _overrides(args))
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; give the .onnx file to write")
    train, _ = load_dataset(config.dataset, config.data_root, seed=config.seed)
    shape = tuple(train.x.shape[1:])
    model = runs.build_model_for(config, shape, train.num_classes)
    blob = export_onnx(model, shape)
    runs.atomic_write(args.out, blob)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {config.model} ({n:,} weights as input 'w'), input 'x' (batch, "
          f"{', '.join(map(str, shape))}), output 'logits' ({train.num_classes} classes), {len(blob):,} bytes")
    return 0


def cmd_presets() -> int:
    for name in preset_names():
        desc = load_preset(name).get("description", "")
        print(f"{name:28s} {desc}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from . import runs

    overrides = _overrides(args)
    if args.resume is not None:
        if args.out is not None:
            raise ConfigError("--out cannot be combined with --resume (the run continues in its own directory)")
        stored = runs.check_resumable(args.resume)  # config, checkpoint and metrics, read once
        # the options given, over the stored values (not the run's preset as it is now: it may since have
        # been renamed, removed or edited); with --preset only --threads, as the preset is checked whole below
        given = {k: v for k, v in overrides.items() if k == "threads"} if args.preset else overrides
        restated = RunConfig.from_dict(stored.to_dict() | given, source="the command line").validate()
        # --threads is a resource of this process, not part of the experiment: a resume may change it
        threads = restated.threads
        overrides.pop("threads", None)
        # a resume that restates its config must restate it exactly: a preset with its options in full,
        # options alone one by one
        if args.preset:
            runs.check_restated(args.resume, stored, resolve(args.preset, overrides | {"threads": stored.threads}))
        elif overrides:
            runs.check_restated(args.resume, stored, dataclasses.replace(restated, threads=stored.threads))
        config, out = stored, args.resume
    else:
        config = resolve(args.preset or DEFAULT_PRESET, overrides)
        out = runs.new_run_dir(config, args.out)
        threads = config.threads
    torch.set_num_threads(threads)
    # a resumed directory is held before anything is printed or built; a new one once it exists
    with runs.locked(out) if args.resume is not None else contextlib.nullcontext():
        setup = runs.build(config)
        return _train(args, config, out, setup)


def _train(args: argparse.Namespace, config: RunConfig, out: Path, setup) -> int:
    from tqdm import tqdm

    from . import runs

    err = sys.stderr
    print(f"baffle: {config.preset}: {config.description}", file=err)
    print(f"baffle: client label counts ({config.partition} partition):\n{setup.label_summary}", file=err)
    print(f"baffle: {config.model} ({setup.simulator.n:,} parameters), {config.method} {config.mode}, "
          f"K={config.num_perturbations}, {config.rounds} rounds; run directory: {out}", file=err)
    for note in setup.notes:
        print(f"baffle: {note}", file=err)
    if config.engine == "compiled":
        print("baffle: engine 'compiled': the first round includes torch.compile (about 10-30 s)", file=err)
    bar = tqdm(total=config.rounds, unit="round", disable=args.quiet, file=err, dynamic_ncols=True)

    def on_round(row: dict) -> None:
        for reason in row.get("rejected", ()):
            bar.write(f"baffle: round {row['round']}: left out {reason}", file=err)
        if row.get("skipped"):
            bar.write(f"baffle: round {row['round']} skipped, model unchanged: {row['skipped']}", file=err)
        if row["test_top1"] is not None:
            bar.set_postfix(acc=f"{100 * row['test_top1']:.2f}%", loss=f"{row['test_loss']:.3f}", refresh=False)
        bar.update(1)

    try:
        if config.engine == "flower":
            from .flower.simulate import run as run_on_flower

            summary = run_on_flower(config, out, resume=args.resume is not None, setup=setup, on_round=on_round)
        else:
            summary = runs.execute(config, out, resume=args.resume is not None, setup=setup, on_round=on_round,
                                   stop=_stop_if_asked)
    except KeyboardInterrupt as e:
        bar.close()
        code = _interrupted_code(e)
        print(f"baffle: interrupted; continue with: baffle run --resume {out}", file=err)
        if config.engine == "flower":
            from .flower.simulate import exit_now

            exit_now(code)  # Flower may leave threads that a normal exit would wait for forever
        return code
    except FloatingPointError as e:
        bar.close()
        print(f"baffle: error: training diverged after round {setup.simulator.round} ({e}); "
              f"{out} keeps the rounds before it; try a smaller learning rate", file=err)
        return 1
    bar.close()
    print(f"run directory: {out}")
    print(f"final test accuracy: {100 * summary['final_test_top1']:.2f}% "
          f"(best {100 * summary['best_test_top1']:.2f}% at round {summary['best_round']}), "
          f"wall {summary['wall_seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    _stops.clear()
    # a signal ignored by whoever started us stays ignored (a script's background job ignores Ctrl-C)
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        if args.command == "presets":
            return cmd_presets()
        if args.command == "export-onnx":
            return cmd_export_onnx(args)
        if args.command == "report":
            from .report import build_report

            print(f"wrote {build_report(args.runs, args.out)}")
            return 0
        return cmd_run(args)
    except (ConfigError, DataError) as e:
        print(f"baffle: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an unwritable --out
        print(f"baffle: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # before training started: nothing was written
        print("baffle: interrupted", file=sys.stderr)
        return _interrupted_code(e)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
