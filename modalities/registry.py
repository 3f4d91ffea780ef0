"""Plugin discovery through the `omnistream.modalities` entry-point group.

The built-ins register through the same group in omnistream's own pyproject,
so they take exactly the path a third-party package takes.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

from omnistream.common.errors import UserError

from .base import BaseModality, Modality

GROUP = "omnistream.modalities"
_REQUIRED = ("name", "version", "keys", "Options", "resources", "error_bound")


@lru_cache(maxsize=1)
def discover() -> dict[str, tuple[type, str]]:
    """name -> (class, distribution version). Errors name the plugin."""
    found: dict[str, tuple[type, str]] = {}
    origin: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist else "?"
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - a plugin's import error of any kind is said as one line
            raise UserError(
                f"modality plugin {ep.name!r} (from {dist}) failed to import: {type(e).__name__}: {e}"
            ) from None
        missing = [a for a in _REQUIRED if not hasattr(cls, a)]
        if missing:
            raise UserError(f"modality plugin {ep.name!r} (from {dist}) lacks {', '.join(missing)}")
        name = cls.name
        if name in found:
            raise UserError(
                f"two plugins claim the modality name {name!r}: {origin[name]} and {ep.value} (from {dist})"
            )
        found[name] = (cls, ep.dist.version if ep.dist else "?")
        origin[name] = f"{ep.value} (from {dist})"
    return found


def get(name: str) -> type:
    plugins = discover()
    if name not in plugins:
        raise UserError(
            f"modality {name!r} is not installed (installed: {', '.join(sorted(plugins)) or 'none'}); "
            f"install its plugin package or remove it from [modalities]"
        )
    return plugins[name][0]


def build(name: str, options: dict | None = None) -> BaseModality:
    """Instantiate a plugin with validated options; a bad option is a UserError naming the key."""
    from pydantic import ValidationError

    cls = get(name)
    try:
        return cls(options or {})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UserError(f"modalities.{name}{'.' + key if key else ''}: {err['msg']}") from None


def check_keys(names) -> dict[str, str]:
    """WebDataset key (file extension) -> modality for the configured modalities; two claiming one
    key would make a record's field mean two things, so that is a UserError naming both."""
    owner: dict[str, str] = {}
    for n in names:
        for ext in get(n).keys:
            if ext in owner:
                raise UserError(
                    f"modalities {owner[ext]!r} and {n!r} both read .{ext} fields: remove one of them from [modalities]"
                )
            owner[ext] = n
    return owner


__all__ = ["GROUP", "discover", "get", "build", "check_keys", "Modality"]
