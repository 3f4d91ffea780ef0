"""Deduplication across the whole stream, held in Ray actors sharded by hash.

Each record gets signatures: an exact content hash over the fields a modality reads, and
(switchable) a perceptual hash of its image (dHash) and MinHash LSH bands of its text. A
`DedupShard` actor owns the signatures whose hash falls in its shard and remembers which record
claimed each first; a later record with the same signature is a duplicate (`duplicate` for the
exact hash, `near_duplicate` for the others). The record's identity is its shard and key, not
the epoch, so a record met again in a later epoch is not a duplicate of itself.

The shards are plain dicts in actor memory: ~100 bytes a signature, so 10 M records over 4
actors is ~250 MB each. A cluster that needs more raises `dedup.shards`.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from functools import lru_cache

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field

from .records import RawRecord


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exact: bool = Field(True, description="drop records whose modality fields are byte-identical to an earlier record's")
    near_image: bool = Field(True, description="drop records whose image is within image_max_hamming of an earlier one's 64-bit dHash")
    image_max_hamming: int = Field(4, ge=0, le=16, description="dHash bits two images may differ in and still be near-duplicates")
    near_text: bool = Field(True, description="drop records whose text is a MinHash near-duplicate of an earlier one")
    text_min_words: int = Field(20, ge=1, description="texts shorter than this are left to the exact check (captions are alike by nature)")
    minhash_bands: int = Field(16, ge=1, description="LSH bands; with 4 rows each, pairs above ~0.5 Jaccard collide")
    minhash_rows: int = Field(4, ge=1, description="MinHash rows per LSH band")
    shards: int = Field(2, ge=1, description="dedup actors; signatures are spread over them by hash")


@ray.remote(num_cpus=0)
class DedupShard:
    """Owns the signatures that hash to this shard: which records claimed each first.

    An item is (signature, record id, payload). With no payload any other record holding the
    signature makes this one a duplicate. With a payload (an image's full dHash) the signature is
    only a band of it, a candidate: the duplicate is confirmed by Hamming distance <= max_hamming
    between the full hashes (multi-index hashing: within distance k, one of k+1 bands must match).
    """

    def __init__(self, max_hamming: int = 0, per_signature: int = 8):
        self.first: dict[str, list[tuple[str, int | None]]] = {}
        self.max_hamming, self.per_signature = max_hamming, per_signature

    def claim(self, items: list[tuple[str, str, int | None]]) -> list[bool]:
        """For each item: True if another record claimed it first."""
        out = []
        for sig, ident, payload in items:
            owners = self.first.setdefault(sig, [])
            if any(o == ident for o, _ in owners):
                out.append(False)
                continue
            dup = any(p is None or payload is None or bin(p ^ payload).count("1") <= self.max_hamming
                      for _, p in owners)
            if not dup and len(owners) < self.per_signature:
                owners.append((ident, payload))
            out.append(dup)
        return out


def exact_signature(fields: dict[str, bytes], exts: set[str]) -> str:
    h = hashlib.sha256()
    for ext in sorted(e for e in fields if e in exts):
        h.update(ext.encode() + b"\0" + hashlib.sha256(fields[ext]).digest())
    return "x:" + h.hexdigest()[:32]


def dhash(im) -> int:
    """64-bit difference hash: grey 9×8, one bit per horizontal gradient sign (robust to re-encoding and resizing)."""
    from PIL import Image

    g = np.asarray(im.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    return int.from_bytes(np.packbits((g[:, 1:] > g[:, :-1]).flatten()).tobytes(), "big")


def dhash_bands(h: int, max_hamming: int) -> list[str]:
    """max_hamming+1 disjoint bit bands of a 64-bit hash: two hashes within max_hamming share one."""
    k = max_hamming + 1
    edges = [round(i * 64 / k) for i in range(k + 1)]
    return [f"i{i}:{(h >> edges[i]) & ((1 << (edges[i + 1] - edges[i])) - 1):x}" for i in range(k)]


_MERSENNE = (1 << 61) - 1


@lru_cache(maxsize=4)
def _permutations(n: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(1234)  # fixed: every worker must draw the same permutations
    return ([int(v) for v in rng.integers(1, _MERSENNE, n, dtype=np.uint64)],
            [int(v) for v in rng.integers(0, _MERSENNE, n, dtype=np.uint64)])


def minhash_bands(text: str, cfg: DedupConfig) -> list[str]:
    words = text.lower().split()
    shingles = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
    a, b = _permutations(cfg.minhash_bands * cfg.minhash_rows)
    hs = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in shingles]
    sig = [min((ai * h + bi) % _MERSENNE for h in hs) for ai, bi in zip(a, b)]
    r = cfg.minhash_rows
    return [f"t{k}:" + hashlib.blake2b(str(sig[k * r:(k + 1) * r]).encode(), digest_size=8).hexdigest()
            for k in range(cfg.minhash_bands)]


def signatures(r: RawRecord, objs: dict[str, object], exts: set[str], cfg: DedupConfig) -> list[tuple]:
    """(reason, signature, payload) triples for one record, exact first."""
    out = []
    if cfg.exact:
        out.append(("duplicate", exact_signature(r.fields, exts), None))
    if cfg.near_image and "image" in objs:
        h = dhash(objs["image"])
        out += [("near_duplicate", b, h) for b in dhash_bands(h, cfg.image_max_hamming)]
    if cfg.near_text and isinstance(objs.get("text"), str) and len(objs["text"].split()) >= cfg.text_min_words:
        out += [("near_duplicate", s, None) for s in minhash_bands(objs["text"], cfg)]
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
            for reason, sig, payload in sigs:
                k = int(hashlib.blake2b(sig.encode(), digest_size=4).hexdigest(), 16) % len(self.shards)
                spots.append((k, len(routed[k]), reason))
                routed[k].append((sig, ident, payload))
            where.append(spots)
        answers = dict(zip(routed, ray.get([self.shards[k].claim.remote(items) for k, items in routed.items()])))
        out = []
        for spots in where:
            hit = [reason for k, i, reason in spots if answers[k][i]]
            out.append(("duplicate" if "duplicate" in hit else hit[0]) if hit else None)
        return out


def start_dedup(cfg: DedupConfig) -> list:
    if not (cfg.exact or cfg.near_image or cfg.near_text):
        return []
    return [DedupShard.remote(cfg.image_max_hamming) for _ in range(cfg.shards)]
