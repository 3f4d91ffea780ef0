"""Run configs that ship inside the package, so an installed `omnistream demo` finds its config."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def path(name: str) -> Path:
    """The shipped config `name` (e.g. "demo" or "demo.toml")."""
    return Path(str(files(__name__) / (name if name.endswith(".toml") else f"{name}.toml")))
