"""``baffle run --engine flower``: the ServerApp and ClientApp on Flower's simulation
runtime (Ray backend), one virtual SuperNode per client, in this process.

The ServerApp runs in a thread of this process (so the progress bar and Ctrl-C work
as for the in-process engines); the ClientApps run in Ray actors, ``config.threads``
of them at a time, one torch thread each.

Ctrl-C: the ServerApp thread abandons its round unwritten and ends; then the process
must end with :func:`exit_now`, not a normal interpreter exit. Flower 1.41's runtime
kills its actors and shuts Ray down while its worker threads may still be in
``ray.get`` on them; such a thread never returns, and a normal exit joins it forever.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from .task import offline_env


SERVER_STOP_SECONDS = 60.0  # the longest the ServerApp thread is given to end after Ctrl-C


def exit_now(code: int) -> None:
    """End the process with ``code`` without joining threads (see the module note on Ctrl-C)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(config: RunConfig, out: Path, *, resume: bool, setup, on_round: Callable[[dict], None] | None = None,
        client_app=None) -> dict:
    """Run ``config`` to the end on Flower simulation; return the summary (errors re-raised here)."""
    offline_env()
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from .client_app import app as default_client_app
    from .server_app import serve

    outcome: dict = {}
    stop = threading.Event()
    server = ServerApp()

    @server.main()
    def _main(grid, context) -> None:
        outcome["thread"] = threading.current_thread()
        try:
            outcome["summary"] = serve(grid, config, out, resume=resume, setup=setup, on_round=on_round, stop=stop)
        except BaseException as e:  # handed to the caller, which reports it like the in-process engines
            outcome["error"] = e

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": config.threads, "num_gpus": 0, "logging_level": logging.ERROR,
                             "log_to_driver": True, "include_dashboard": False}}
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(logging.WARNING)  # Flower's per-round INFO lines would tear the progress bar
    try:
        run_simulation(server, client_app or default_client_app, num_supernodes=config.num_clients,
                       backend_name="ray", backend_config=backend)
    except KeyboardInterrupt:
        stop.set()  # the ServerApp thread abandons its round unwritten; the checkpoint is the last full round
        if "thread" in outcome:  # let it end within SERVER_STOP_SECONDS (a round being written is finished)
            outcome["thread"].join(SERVER_STOP_SECONDS)
        raise
    finally:
        FLOWER_LOGGER.setLevel(level)
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError("the Flower simulation ended before the ServerApp finished (see the log above)")
    return outcome["summary"]
