"""baffle as a Flower app: the same rounds with each client on a Flower node.

    server_app.py   ServerApp: baffle's server loop (:class:`baffle.simulation.Simulator`)
                    with :class:`FlowerClients` carrying the plans; writes the usual run
                    directory
    client_app.py   ClientApp: one client's half of a round (:func:`baffle.modes.client_update`)
    task.py         the messages between them
    simulate.py     ``baffle run --engine flower`` (Flower simulation, Ray backend)
    pyproject.toml  the Flower app's manifest, for ``flwr run`` (APP_DIR is this folder)
"""
from pathlib import Path

APP_DIR = Path(__file__).parent
