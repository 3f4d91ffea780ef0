"""Deduplication across the whole stream, held in Ray actors sharded by hash.

Each record gets signatures: an exact content hash over the fields a modality reads, and
(switchable per modality) each modality's near-duplicate signatures, such as the image
modality's perceptual hash (dHash) bands and the text modality's MinHash LSH bands. A
`DedupShard` actor owns the signatures whose hash falls in its shard and remembers which record
claimed each first; a later record with the same signature is a duplicate (`duplicate` for the
exact hash, `near_duplicate` for the others). The record's identity is its shard and key, not
the epoch, so a record met again in a later epoch is not a duplicate of itself.

The shards are plain dicts in actor memory: ~100 bytes a signature, so 10 M records in one actor
is ~1 GB. One actor is the default because a record's signatures must be claimed atomically: with
several actors, two near-duplicates in flight at once in two tokenizer actors can each win a
different band (in different actors) and both be dropped. `dedup.shards` spreads the memory over
more actors where that over-filtering (counted, never silent) is the lesser evil.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import ray

from .config import DedupConfig
from .records import RawRecord


@ray.remote(num_cpus=0)
class DedupShard:
    """Owns the signatures that hash to this shard: which records claimed each first.

    An item is (signature, record id, payload, max_distance). With no payload any other record
    holding the signature makes this one a duplicate. With a payload (an image's full dHash) the
    signature is only a band of it, a candidate: the duplicate is confirmed by a Hamming distance
    <= max_distance between the payloads (multi-index hashing: within distance k, one of k+1 bands
    must match).
    """

    def __init__(self, per_signature: int = 8):
        self.first: dict[str, list[tuple[str, int | None]]] = {}
        self.per_signature = per_signature

    def claim(self, items: list[tuple[str, str, int | None, int]]) -> list[bool]:
        """For each item: True if another record claimed it first."""
        out = []
        for sig, ident, payload, max_distance in items:
            owners = self.first.setdefault(sig, [])
            if any(o == ident for o, _ in owners):
                out.append(False)
                continue
            dup = any(p is None or payload is None or bin(p ^ payload).count("1") <= max_distance for _, p in owners)
            if not dup and len(owners) < self.per_signature:
                owners.append((ident, payload))
            out.append(dup)
        return out


def exact_signature(fields: dict[str, bytes], exts: set[str]) -> str:
    h = hashlib.sha256()
    for ext in sorted(e for e in fields if e in exts):
        h.update(ext.encode() + b"\0" + hashlib.sha256(fields[ext]).digest())
    return "x:" + h.hexdigest()[:32]


def signatures(
    r: RawRecord, objs: list[tuple[str, object]], fields: set[str], mods: dict, filters: dict, cfg: DedupConfig
) -> list[tuple]:
    """(reason, signature, payload, max_distance) for one record: the exact one first (over the bytes of
    `fields`, the parts it keeps), then each part's near-duplicate signatures (Modality.near_signatures),
    prefixed with its modality's name. `objs`: the decoded parts, (modality, object)."""
    out = []
    if cfg.exact:
        out.append(("duplicate", exact_signature(r.fields, fields), None, 0))
    if cfg.near:
        for name, obj in objs:
            f = filters[name]
            if f.near_duplicates:
                out += [
                    ("near_duplicate", f"{name}:{sig}", payload, dist)
                    for sig, payload, dist in getattr(mods[name], "near_signatures", _none)(obj, f)
                ]
    return out


class Deduper:
    """Client side, inside a pipeline actor: one round trip per batch of records to each shard actor."""

    def __init__(self, shards: list, cfg: DedupConfig):
        self.shards, self.cfg = shards, cfg

    def duplicates(self, batch: list[tuple[str, list[tuple]]]) -> list[str | None]:
        """For each (record id, its signatures): the reason it is a duplicate, or None."""
        routed: dict[int, list] = defaultdict(list)
        where: list[list[tuple[int, int, str]]] = []
        for ident, sigs in batch:
            spots = []
            for reason, sig, payload, max_distance in sigs:
                k = int(hashlib.blake2b(sig.encode(), digest_size=4).hexdigest(), 16) % len(self.shards)
                spots.append((k, len(routed[k]), reason))
                routed[k].append((sig, ident, payload, max_distance))
            where.append(spots)
        answers = dict(zip(routed, ray.get([self.shards[k].claim.remote(items) for k, items in routed.items()])))
        out = []
        for spots in where:
            hit = [reason for k, i, reason in spots if answers[k][i]]
            out.append(("duplicate" if "duplicate" in hit else hit[0]) if hit else None)
        return out


def start_dedup(cfg: DedupConfig) -> list:
    if not (cfg.exact or cfg.near):
        return []
    return [DedupShard.remote() for _ in range(cfg.shards)]


def _none(*_):
    return []
