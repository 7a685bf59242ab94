"""baffle: backpropagation-free federated learning (BAFFLE, Feng et al., arXiv 2301.12195).

Clients run forward passes only: each probes K seeded Gaussian directions and
uploads K scalars; the server rebuilds a gradient with Stein's identity.

Exports are loaded lazily so that ``baffle.perturb`` (the NumPy direction stream)
imports without torch on inference-only clients.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "zo_gradient": "estimators", "probe": "estimators", "combine": "estimators", "ProbePlan": "plan",
    "SCHEMES": "plan",
    "Layout": "perturb", "derive_seed": "perturb", "normals_np": "perturb", "directions_np": "perturb",
    "normals": "perturb_torch", "directions": "perturb_torch",
    "Algorithm": "modes", "RoundPlan": "modes", "Upload": "modes", "client_update": "modes",
    "server_decode": "modes", "MODES": "modes", "METHODS": "modes",
    "Server": "server", "ServerOptions": "server",
    "Simulator": "simulation", "RoundRecord": "simulation",
    "FlatModel": "flatmodel",
    "Engine": "engine", "ENGINES": "engine",
    "SecureOptions": "aggregation.options", "secure_weighted_sum": "aggregation.secure",
    "SecureAggConfig": "aggregation.secure",
    "ModelSpec": "models", "build_model": "models", "MODELS": "models",
    "load_dataset": "data", "partition": "data", "ArrayDataset": "data", "DATASETS": "data",
    "PARTITIONERS": "data",
    "RunConfig": "config", "resolve": "config",
    "execute": "runs",
    "OnnxClient": "edge", "Refused": "edge",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'baffle' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
