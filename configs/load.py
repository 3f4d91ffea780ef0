"""Loading a run config: defaults, then a TOML file, then `--set a.b=value` overrides, validated into the
typed tree (schema.py). Unknown keys and bad values are errors that name the key; `describe` lists every
key with its default and doc.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tomllib
from omnistream.common.errors import UserError
from omnistream.modalities import registry
from pydantic import BaseModel, ValidationError

from .schema import RunConfig


def parse_value(text: str) -> Any:
    """`--set` values are TOML values (4, 1e-3, true, "x", [1, 2]); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key=value, e.g. --set model.n_layers=4")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {key}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = parse_value(value.strip())


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """defaults <- TOML file <- overrides; a mistake is a UserError naming the key."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file {p} does not exist")
        try:
            tree = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {p} is not valid TOML: {e}") from None
    for o in overrides or []:
        apply_override(tree, o)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        where = f" in {path}" if path else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"config key {key}{where}: {msg}" if key else f"config{where}: {msg}") from None


def describe(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """`key = default  # description` lines for every field (config docs and --help)."""
    import dataclasses

    lines = []
    if dataclasses.is_dataclass(model):
        for f in dataclasses.fields(model):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('doc', '')}")
        return lines
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and (issubclass(ann, BaseModel) or dataclasses.is_dataclass(ann)):
            lines.append(f"[{prefix}{name}]  # {f.description}")
            lines += describe(ann, f"{prefix}{name}.")
        else:
            default = f.get_default(call_default_factory=True)
            lines.append(f"{prefix}{name} = {default!r}  # {f.description}")
    return lines


def describe_modalities() -> list[str]:
    """`[modalities.<name>]` options and `[data.quality.<name>]` filters of every installed plugin."""
    lines = []
    for name, (cls, _) in sorted(registry.discover().items()):
        lines.append(f"[modalities.{name}]  # options of {cls.__module__}.{cls.__qualname__}")
        lines += describe(cls.Options, f"modalities.{name}.")
        filters = getattr(cls, "Filters", None)
        if filters is not None:
            lines.append(f"[data.quality.{name}]  # quality filters and near-duplicate settings of {name}")
            lines += describe(filters, f"data.quality.{name}.")
    return lines
