"""Run configuration: one flat, fully resolved record, presets and overrides.

A preset is a small JSON file in ``baffle/presets/`` holding a subset of the
fields of :class:`RunConfig` (or, with ``"extends"``, what differs from another
preset); command-line options override it; the resolved
record is what ``config.json`` in the run directory holds.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .data import PARTITIONERS
from .aggregation.options import SecureOptions
from .engine import ENGINES
from .modes import Algorithm
from .server import ServerOptions

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A bad option, value or preset: the message names it."""


@dataclass(frozen=True)
class RunConfig:
    # what to train
    dataset: str = "mnist"
    data_root: str | None = None
    model: str = "lenet"
    norm: str = "none"
    activation: str = "hardswish"
    # federation
    num_clients: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    min_client_size: int = 1
    client_fraction: float = 1.0
    rounds: int = 20
    # the algorithm (see baffle.modes.Algorithm)
    mode: str = "fedsgd"
    method: str = "baffle"
    num_perturbations: int = 100
    sigma: float = 1e-4
    scheme: str = "forward"
    batch_size: int = 32
    local_epochs: int = 1
    local_steps: int = 0
    client_optimizer: str = "adam"
    client_lr: float = 0.01
    client_weight_decay: float = 0.0
    # the server (see baffle.server.ServerOptions)
    server_optimizer: str = "adam"
    server_lr: float = 0.01
    server_weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    ema_decay: float = 0.0
    lr_schedule: str = "constant"
    # running
    seed: int = 0
    eval_every: int = 1
    train_eval_size: int = 2000
    threads: int = 2
    probe_block: int = 8
    clients_per_forward: int = 16
    engine: str = "loop"  # "loop" or "compiled" (in process), or "flower": Flower simulation, clients on "loop"
    # faults: a round updates the model only if at least min_replies chosen clients replied
    min_replies: int = 1
    reply_timeout: float = 600.0  # Flower: seconds the server waits for a round's replies
    # secure aggregation (baffle.aggregation.options.SecureOptions)
    secure_aggregation: bool = False
    secagg_fraction_bits: int = 24
    secagg_clip: float = 64.0
    secagg_threshold: int = 0
    secagg_dropout: float = 0.0
    # inference-only clients (baffle.edge): the first onnx_clients clients run ONNX Runtime + NumPy
    onnx_clients: int = 0
    onnx_model: str | None = None  # a file from `baffle export-onnx` (default: export the run's model)
    preset: str = ""
    description: str = ""

    def algorithm(self) -> Algorithm:
        """The Algorithm fields come from the fields of the same name (betas from beta1/2)."""
        same = {f.name for f in fields(Algorithm)} - {"betas"}
        return Algorithm(**{name: getattr(self, name) for name in same}, betas=(self.beta1, self.beta2))

    def server_options(self) -> ServerOptions:
        return ServerOptions(optimizer=self.server_optimizer, lr=self.server_lr, betas=(self.beta1, self.beta2),
                             ema_decay=self.ema_decay, schedule=self.lr_schedule, total_steps=self.rounds,
                             weight_decay=self.server_weight_decay)

    def secure_options(self) -> SecureOptions | None:
        if not self.secure_aggregation:
            return None
        return SecureOptions(self.secagg_fraction_bits, self.secagg_clip, self.secagg_threshold, self.secagg_dropout)

    def compute_engine(self) -> str:
        """How each process evaluates forward passes (Flower clients use the eager loop)."""
        return "loop" if self.engine == "flower" else self.engine

    def clients_per_round(self) -> int:
        return max(1, round(self.client_fraction * self.num_clients))

    def validate(self) -> "RunConfig":
        """Check every value; raise ConfigError naming the first bad one."""
        try:
            self.algorithm()
            self.server_options()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            secure = self.secure_options()
            if secure is not None:
                secure.config(self.clients_per_round())
        except ValueError as e:
            raise ConfigError(f"secure aggregation: {e}") from None
        for name in ("num_clients", "rounds", "eval_every", "threads", "shards_per_client", "min_client_size",
                     "train_eval_size", "clients_per_forward", "min_replies"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if not 0 < self.client_fraction <= 1:
            raise ConfigError(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.engine not in ENGINES + ("flower",):
            raise ConfigError(f"unknown engine {self.engine!r} (choose from {', '.join(ENGINES)}, flower)")
        if self.min_replies > self.clients_per_round():
            raise ConfigError(f"min_replies must be <= the clients of a round ({self.clients_per_round()}), "
                              f"got {self.min_replies}")
        if not (math.isfinite(self.reply_timeout) and self.reply_timeout > 0):
            raise ConfigError(f"reply_timeout must be > 0 seconds, got {self.reply_timeout}")
        if self.partition not in PARTITIONERS:
            raise ConfigError(f"unknown partition {self.partition!r} (choose from {', '.join(PARTITIONERS)})")
        if not 0 <= self.onnx_clients <= self.num_clients:
            raise ConfigError(f"onnx_clients must be in [0, num_clients = {self.num_clients}], got {self.onnx_clients}")
        if self.onnx_clients and self.engine == "flower":
            raise ConfigError(f"onnx_clients run in the simulator's process, not on Flower nodes; "
                              f"with engine flower use onnx_clients 0, got {self.onnx_clients}")
        if self.onnx_clients and (self.mode, self.method) != ("fedsgd", "baffle"):
            raise ConfigError(f"onnx_clients need mode fedsgd with method baffle, got {self.mode}/{self.method}")
        if self.client_weight_decay and self.mode != "fedavg":
            raise ConfigError(f"client_weight_decay acts on FedAvg's local steps; with mode {self.mode} "
                              f"the server takes the steps (server_weight_decay), got {self.client_weight_decay}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2^63), got {self.seed}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def optional_fields(cls) -> set[str]:
        return {f.name for f in fields(cls) if f.type == "str | None"}

    @classmethod
    def field_types(cls) -> dict[str, type]:
        kinds = {"int": int, "float": float, "str": str, "str | None": str, "bool": bool}
        return {f.name: kinds[f.type] for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        types = cls.field_types()
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r} in {source}")
        return cls(**{k: coerce(k, v, types[k]) for k, v in values.items()})


def coerce(name: str, value: Any, kind: type) -> Any:
    """Convert a JSON or command-line value to the field's type, naming it on failure."""
    if value is None and name in OPTIONAL:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if value is None:  # str() would make it the text "None"
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The preset's values. ``"extends": "other"`` in a preset takes every value of preset
    ``other`` but its description, then the preset's own on top: a derived preset holds only
    what makes it different (an ablation, another K)."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        where = f"preset {_chain[-1]!r} extends" if _chain else "unknown preset"
        raise ConfigError(f"{where} {name!r} (see `baffle presets`: {', '.join(preset_names())})")
    values = read_json_object(path, f"preset {name!r}")
    base = values.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"preset {name!r}: extends must name a preset, got {base!r}")
        if base in (*_chain, name):
            chain = (*_chain, name, base)
            raise ConfigError(f"preset {chain[0]!r}: extends goes round in a circle: {' -> '.join(chain)}")
        if "description" not in values:  # the base's would describe another experiment
            raise ConfigError(f"preset {name!r} extends {base!r} but has no description of its own")
        inherited = load_preset(base, (*_chain, name))
        inherited.pop("description", None)
        values = {**inherited, **values}
    values["preset"] = name
    return values


def read_json_object(path: Path, context: str) -> dict[str, Any]:
    """The JSON object stored at ``path``; a one-line ConfigError "<context>: ..." when it is
    missing, corrupt or not an object."""
    if not path.is_file():
        raise ConfigError(f"{context}: no {path.name} there")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{context}: {path.name} is corrupt ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{context}: {path.name} is not a JSON object")
    return values


def resolve(preset: str, overrides: dict[str, Any]) -> RunConfig:
    """Preset values, then overrides; validated."""
    values = load_preset(preset)
    values.update(overrides)
    return RunConfig.from_dict(values, source=f"preset {preset!r}").validate()


OPTIONAL = RunConfig.optional_fields()  # str | None fields: None (or "" on the command line) means unset
