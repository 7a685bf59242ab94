"""baffle on a Flower deployment on loopback: flower-superlink, two flower-supernodes, `flwr run`.

No Ray here, so this file may run beside test_flower.py (which counts Ray's processes).
"""
import json
import time

import pytest

from baffle.flower.local import LocalDeployment
from test_cli import rows, wait_until
from test_flower import _processes_mentioning


@pytest.mark.parametrize("rounds,extra", [(2, ""), (1, " secure-aggregation=true")], ids=["plain", "secure"])
def test_deployment_on_loopback_runs_to_the_end_and_stops_cleanly(tmp_path, rounds, extra):
    run = tmp_path / "run"
    options = f"dataset=synthetic num-clients=2 rounds={rounds} num-perturbations=10 batch-size=16 train-eval-size=100"
    with LocalDeployment(nodes=2, home=tmp_path / "flwr-home") as fed:
        out = fed.run(run, options + extra, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"baffle: round {rounds} done, 2 clients" in out.stdout + out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["forward_passes_total"] == rounds * 2 * 11
    got = rows(run)
    assert [r["clients"] for r in got] == [2] * rounds
    assert all(not r["rejected"] and r["skipped"] is None for r in got)
    assert all(r["secure_extra_bytes"] > 0 for r in got) == bool(extra)
    assert {p.name for p in run.iterdir()} >= {"config.json", "curves.png", "model.safetensors"}
    def left() -> list[str]:  # the nodes' workers watch their parent and exit after it
        return [line for p in fed.ports for line in _processes_mentioning(f"127.0.0.1:{p}")]
    assert wait_until(lambda: not left(), time.time() + 30, every=0.5), left()
