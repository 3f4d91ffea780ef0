"""Configuration: the typed config tree (schema.py), how a run's config is layered from defaults, a TOML
file and `--set` overrides (load.py), and the run configs that ship inside the package (demo.toml), so
an installed `omnistream demo` finds its config."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .load import describe, describe_modalities, load_config
from .schema import (
    ClusterConfig,
    EvalConfig,
    EvalTask,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "ClusterConfig",
    "EvalConfig",
    "EvalTask",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "describe",
    "describe_modalities",
    "load_config",
    "path",
]


def path(name: str) -> Path:
    """The shipped config `name` (e.g. "demo" or "demo.toml")."""
    return Path(str(files(__name__) / (name if name.endswith(".toml") else f"{name}.toml")))
