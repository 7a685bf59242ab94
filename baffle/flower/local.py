"""A Flower deployment on this machine's loopback: one ``flower-superlink``, N
``flower-supernode`` processes (node i is client i), and ``flwr run`` against them.

The same processes a user starts by hand (README, "Flower deployment"); used by the
tests and ``benchmarks/flower.py``. Every process gets its own session, so
:meth:`LocalDeployment.stop` ends each with everything it started.

    with LocalDeployment(nodes=2, home=tmp) as fed:
        fed.run(out, "dataset=synthetic num-clients=2 rounds=2")
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import APP_DIR
from .task import OFFLINE_ENV

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{Path(proc.args[0]).name} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


class LocalDeployment:
    """SuperLink + ``nodes`` SuperNodes on free loopback ports; ``home`` is FLWR_HOME."""

    def __init__(self, nodes: int, home: Path, *, node_threads: int = 1):
        self.nodes, self.home, self.node_threads = nodes, Path(home), node_threads
        self.link = free_port()
        self.node_ports = [free_port() for _ in range(nodes)]
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs: list[subprocess.Popen] = []
        self._logs = []

    @property
    def ports(self) -> list[int]:
        return [self.link, *self.node_ports]

    def _start(self, name: str, *cmd: str) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "w")
        self._logs.append(log)
        proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> "LocalDeployment":
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.link}"\n'
            "insecure = true\n")
        wait_port(self.link, self._start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
                                         "--port", str(self.link)))
        for i, port in enumerate(self.node_ports):
            config = f"partition-id={i} num-partitions={self.nodes} threads={self.node_threads}"
            wait_port(port, self._start(f"node{i}", "flower-supernode", "--insecure", "--superlink",
                                        f"127.0.0.1:{self.link}", "--port", str(port), "--node-config", config))
        return self

    def run(self, out: Path, options: str, preset: str = "quick", timeout: float = 1800) -> subprocess.CompletedProcess:
        """``flwr run`` baffle's app against this federation, to the end (``--stream``)."""
        return subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "--stream", "--run-config",
                               f'preset="{preset}" out="{out}" options="{options}"'],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in self._logs:
            log.close()

    def __enter__(self) -> "LocalDeployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
