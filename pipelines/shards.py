"""Shard listing: local paths, globs, {000..099} braces and fsspec URLs -> an ordered shard list."""

from __future__ import annotations

import glob as _glob
import os
import random
from collections.abc import Iterable

from braceexpand import braceexpand

from omnistream.common.errors import UserError

REMOTE = ("s3://", "gs://", "gcs://", "http://", "https://", "hf://", "az://", "abfs://")


def identity(url: str, info: dict) -> list:
    """[url, size, modified] of a listed object (its LastModified, or ETag where a store gives no date)."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("ETag")
    return [url, info.get("size"), str(mtime) if mtime is not None else None]


class _Folders:
    """Remote folders listed once each (one request per 1,000 objects), however many shards they hold: a
    brace range of 20,000 names costs the listing of their folder, not a request per name."""

    def __init__(self):
        self.seen: dict[tuple, dict[str, dict]] = {}

    def entries(self, fs, folder: str) -> dict[str, dict]:
        k = (id(fs), folder)
        if k not in self.seen:
            try:
                self.seen[k] = {e["name"].rstrip("/"): e for e in fs.ls(folder, detail=True)}
            except (FileNotFoundError, OSError):
                self.seen[k] = {}
        return self.seen[k]


def list_shards(specs: str | Iterable[str], info: dict[str, list] | None = None) -> list[str]:
    """Expand each spec's braces, then glob the result; keep the first occurrence of each shard.

    A spec that matches nothing is a user mistake (docs/architecture.md, Errors): it names the spec. A
    member of a {a..b} brace range that names one file (no glob) is listed even when it is not there: its
    read errors it as `shard_missing`, counted, where dropping it would read 99 of 100 and say nothing.

    Remote shards are found by listing their folders (each once: requests grow with listing pages, not
    with shards); `info`, when given, receives each listed shard's identity ([url, size, modified]) from
    that listing, so the token cache's key costs no request per shard (cache.cache_key).
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    seen: set[str] = set()
    folders = _Folders()
    for spec in specs:
        matched: list[str] = []
        members = list(braceexpand(spec))
        missing: list[str] = []  # named one by one by a brace range, and not there
        for s in members:
            literal = not any(c in s for c in "*?[")
            if s.startswith(("http://", "https://")):
                matched.append(s)  # no listing over plain HTTP; the read reports a missing one
            elif s.startswith(REMOTE):
                import fsspec

                fs, path = fsspec.core.url_to_fs(s)
                proto = s.split("://", 1)[0]
                if literal:
                    e = folders.entries(fs, path.rstrip("/").rsplit("/", 1)[0]).get(path.rstrip("/"))
                    hits = {path.rstrip("/"): e} if e is not None else {}
                else:
                    hits = fs.glob(path, detail=True)
                found = []
                for p in sorted(hits):
                    found.append(f"{proto}://{p}")
                    if info is not None:
                        info[found[-1]] = identity(found[-1], hits[p])
                matched += found
                if not found and literal and len(members) > 1:
                    missing.append(s)
            elif not literal:
                matched += sorted(_glob.glob(s))
            elif os.path.exists(s):
                matched.append(os.path.abspath(s))
            elif len(members) > 1:
                missing.append(os.path.abspath(s))
        if not matched:
            raise UserError(f"no shards found for {spec!r}")
        matched += missing  # each errored as shard_missing when read (records.read_shard), and counted
        for m in matched:
            m = m if m.startswith(REMOTE) else os.path.abspath(m)
            if m not in seen:
                seen.add(m)
                out.append(m)
    return out


def shard_order(shards: list[str], seed: int, epochs: int, source: str = "") -> list[tuple[int, str]]:
    """(epoch, shard) pairs: every epoch visits every shard once, in an order drawn from (seed, epoch), and
    from the source's name for a named source (two sources with the same shards are not read in step)."""
    plan = []
    for epoch in range(epochs):
        order = list(shards)
        random.Random(f"{seed}:{source}:{epoch}" if source else f"{seed}:{epoch}").shuffle(order)
        plan += [(epoch, s) for s in order]
    return plan
