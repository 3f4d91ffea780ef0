"""Loading a run config: defaults, then a TOML file, then `--set a.b=value` overrides, validated into the
typed tree (schema.py). Unknown keys and bad values are errors that name the key; `describe` lists every
key with its default and doc.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ValidationError

from omnistream.common.errors import UserError
from omnistream.common.logs import redact
from omnistream.modalities import registry

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
    """defaults <- TOML file <- overrides; a mistake is a UserError naming the key, where its value came from
    (`--set`, or the file and line), the form expected, and the closest key for a typo."""
    tree: dict = {}
    text = ""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file {p} does not exist")
        text = p.read_text()
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {p} is not valid TOML: {e}") from None
    from_cli: dict[str, str] = {}
    for o in overrides or []:
        apply_override(tree, o)
        from_cli[o.split("=", 1)[0].strip()] = o
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        key = ".".join(loc)
        msg = (
            "no such key"
            if err["type"] in ("extra_forbidden", "unexpected_keyword_argument")
            else err["msg"].removeprefix("Value error, ")
        ) + _hint(err, loc)
        raise UserError(
            f"{_source(key, from_cli, path, text)}: {msg}" if key else f"config{_in(path)}: {msg}"
        ) from None
    except UserError as e:  # a modality's options, checked by its plugin: "modalities.<name>[.key]: ..."
        key = str(e).split(":", 1)[0]
        if key.startswith("modalities.") and " " not in key:
            msg = str(e).split(":", 1)[1].strip().removeprefix("Value error, ")
            raise UserError(f"{_source(key, from_cli, path, text)}: {msg}") from None
        raise
    for key, value in cfg.flat().items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and credentials_in_url(v):
                raise UserError(
                    f"{redact(_source(key, from_cli, path, text))}: {redact(v)!r} carries credentials in the URL "
                    f"(user:password@). A config is saved with every run (params, resolved.toml, "
                    f"checkpoints, the token cache, the data report): give them through the environment "
                    f"instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://, MLFLOW_TRACKING_USERNAME / "
                    f"MLFLOW_TRACKING_PASSWORD for a tracking server)"
                )
    return cfg


def credentials_in_url(text: str) -> bool:
    """A URL with user information (`scheme://user:secret@host`, `https://TOKEN@host`) anywhere in `text`."""
    return redact(text) != text


def _in(path) -> str:
    return f" in {path}" if path else ""


def _source(key: str, from_cli: dict[str, str], path, text: str) -> str:
    """Where the value of `key` came from: the `--set` that wrote it (or a section above it), else the
    config file's line, else the defaults."""
    for k, assignment in from_cli.items():
        if k == key or key.startswith(k + ".") or k.startswith(key + "."):
            return f"--set {assignment}"
    line = _line_of(text, key) if text else None
    if line:
        return f"config key {key} in {path}, line {line}"
    return f"config key {key}{_in(path)}"


def _line_of(text: str, key: str) -> int | None:
    """The line of a TOML text that assigns `key` (or opens its table): `[a.b]` then `c = ...`, `a.b.c = ...`
    at the top, or `[a.b.c]`. Found by reading lines, as tomllib keeps no positions."""
    import re

    section = ""
    best = None
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"^\[+\s*([^\]]+?)\s*\]+$", line)
        if m:
            section = m.group(1).replace(" ", "").replace('"', "")
            if section == key:  # the key is a table: its header line, unless one of its lines says more
                best = n
            continue
        m = re.match(r"^([A-Za-z0-9_.\"\- ]+?)\s*=", line)
        if m:
            full = ".".join(x for x in (section, m.group(1).replace(" ", "").replace('"', "")) if x)
            if full == key or key.startswith(full + "."):
                return n
    return best


def _hint(err: dict, loc: list[str]) -> str:
    """What to write instead: the TOML form of a list, the closest key for a typo."""
    import difflib

    if err["type"] == "list_type":
        return f' (a TOML list: {loc[-1]} = ["a", "b"], or on the command line --set \'{".".join(loc)}=["a"]\')'
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        names = _fields_at(RunConfig, loc[:-1])
        close = difflib.get_close_matches(loc[-1], names, n=1)
        return (
            f"; did you mean {'.'.join([*loc[:-1], close[0]])}?"
            if close
            else (f"; the keys here are {', '.join(sorted(names))}" if names else "")
        )
    return ""


def _fields_at(model, loc: list[str]) -> list[str]:
    """The key names of the config section at `loc` (a section is a pydantic model, or a dataclass at its end:
    the model's GPTConfig)."""
    import dataclasses

    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields):
            return []
        model = model.model_fields[part].annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    if dataclasses.is_dataclass(model):
        return [f.name for f in dataclasses.fields(model)]
    return []


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
