"""Shard listing: local paths, globs, {000..099} braces and fsspec URLs -> an ordered shard list."""

from __future__ import annotations

import glob as _glob
import os
import random
from collections.abc import Iterable

from braceexpand import braceexpand

from omnistream.common.errors import UserError

REMOTE = ("s3://", "gs://", "gcs://", "http://", "https://", "hf://", "az://", "abfs://")


def list_shards(specs: str | Iterable[str]) -> list[str]:
    """Expand each spec's braces, then glob the result; keep the first occurrence of each shard.

    A spec that matches nothing is a user mistake (docs/architecture.md, Errors): it names the spec. A
    member of a {a..b} brace range that names one file (no glob) is listed even when it is not there: its
    read errors it as `shard_missing`, counted, where dropping it would read 99 of 100 and say nothing.
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    seen: set[str] = set()
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
                found = [f"{proto}://{p}" for p in sorted(fs.glob(path))]
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
