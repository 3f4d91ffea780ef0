"""The token stream: shards -> records -> documents -> packed rows, as one Ray Dataset.

    from_items(epoch, shard)        the seeded shard plan, one block per shard
      .flat_map(read)               records with raw field bytes (records.py)
      .map_batches(TokenizeDocs)    actors load the tokenizer bundle once; decode
                                    each field with its modality, encode, add
                                    begin/end markers in a seeded order
      .map_batches(PackRows)        first-fit-decreasing packing (packing.py)

Ray Train then splits the rows across training workers (streaming_split).
Order is preserved (DataContext.execution_options.preserve_order), so a run
with the same seed and shards reads the same rows in the same order.
"""
from __future__ import annotations

import hashlib
import random
from typing import Iterable

import numpy as np
import ray

from modalities.base import BadSample
from modalities.vocab import Vocabulary

from .accounting import Tally
from .config import DataConfig
from .packing import pack_documents
from .records import RawRecord, read_shard
from .shards import list_shards, shard_order

# ids kept per tokenizer actor for later epochs; ~50 ids a record at 8 bytes is ~0.5 GB at this bound
MAX_CACHED_RECORDS = 1_000_000


def ext_map(vocab: Vocabulary) -> dict[str, str]:
    return {ext: m.name for m in vocab.modalities for ext in m.keys}


def decode_fields(vocab: Vocabulary, exts: dict[str, str], fields: dict[str, bytes]) -> dict[str, object]:
    """modality name -> decoded object, for the fields some modality reads. Raises BadSample."""
    objs: dict[str, object] = {}
    for ext, data in fields.items():
        name = exts.get(ext)
        if name is None:
            continue
        if name in objs:
            raise BadSample("duplicate_modality", f"two fields for {name!r} (.{ext})")
        try:
            objs[name] = vocab.by_name[name].decode_bytes(ext, data)
        except BadSample as e:
            e.field = ext
            raise
    if not objs:
        raise BadSample("no_readable_field", f"fields {sorted(fields)} match no installed modality")
    return objs


def record_rng(seed: int, epoch: int, key: str) -> random.Random:
    return random.Random(hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest())


def make_document(vocab: Vocabulary, parts: dict[str, np.ndarray], order: str, rng: random.Random | None):
    """Lay out one document from each modality's local ids; returns (tokens, modality_ids)."""
    names = [n for n in vocab.names if n in parts]
    if order == "random" and rng is not None:
        rng.shuffle(names)  # both directions (image→text and text→image) get learned
    return vocab.document([(n, parts[n]) for n in names])


def tokenize_record(vocab: Vocabulary, exts: dict[str, str], r: RawRecord, epoch: int, seed: int, order: str,
                    tally: Tally, cache: dict | None = None):
    """One record -> (local ids per modality, tokens, modality ids), or None when it is bad: then it
    is counted under its reason and listed as a dead letter. Every call counts the record as seen.

    `cache` maps (shard, key) to the encoded ids, so later epochs only lay documents out again
    (the modality order changes per epoch; the ids do not).
    """
    tally.seen += 1
    try:
        parts = cache.get((r.shard, r.key)) if cache is not None else None
        if parts is None:
            if r.error:
                raise BadSample(r.error, r.detail)
            objs = decode_fields(vocab, exts, r.fields)
            parts = {n: vocab.by_name[n].encode(o) for n, o in objs.items()}
            if cache is not None and len(cache) < MAX_CACHED_RECORDS:
                cache[(r.shard, r.key)] = parts
        t, m = make_document(vocab, parts, order, record_rng(seed, epoch, r.key))
    except BadSample as e:
        tally.errored[e.reason] += 1
        tally.dead_letter.append({"shard": r.shard, "key": r.key, "field": getattr(e, "field", ""),
                                  "reason": e.reason, "detail": e.detail[:200]})
        return None
    tally.kept += 1
    tally.per_modality.update(parts.keys())
    return parts, t, m


class TokenizeDocs:
    """Ray Data actor: loads the bundle once; (epoch, shard) rows in, documents out.

    Reading happens here too, so raw field bytes never pass through the object store (reading
    and tokenizing in separate operators cost ~2x the CPU on the demo). Outcomes go to the ledger.
    """

    def __init__(self, bundle_dir: str, names: list[str], seed: int, order: str, max_member_bytes: int,
                 ledger=None, cache: bool = True):
        self.vocab = Vocabulary.load(bundle_dir, names)
        self.exts = ext_map(self.vocab)
        self.seed, self.order, self.max_member_bytes, self.ledger = seed, order, max_member_bytes, ledger
        self.cache: dict | None = {} if cache else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tally = Tally()
        keys, toks, mods = [], [], []
        for epoch, shard in zip(batch["epoch"], batch["shard"]):
            for r in read_shard(str(shard), self.max_member_bytes):
                out = tokenize_record(self.vocab, self.exts, r, int(epoch), self.seed, self.order, tally, self.cache)
                if out is None:
                    continue
                keys.append(f"{int(epoch)}:{r.shard}:{r.key}")
                toks.append(out[1].astype(np.int32))
                mods.append(out[2].astype(np.int8))
        if self.ledger is not None:
            self.ledger.add.remote(tally)
        out_t = np.empty(len(toks), dtype=object)
        out_m = np.empty(len(mods), dtype=object)
        out_t[:], out_m[:] = toks, mods
        return {"key": np.array(keys, dtype=object), "tokens": out_t, "mods": out_m}


def _read(row: dict, max_member_bytes: int) -> Iterable[dict]:
    """Ray Data flat_map: one (epoch, shard) row -> its records with raw field bytes (tokenizer fitting)."""
    for r in read_shard(row["shard"], max_member_bytes):
        yield {"epoch": int(row["epoch"]), "shard": r.shard, "key": r.key, "exts": list(r.fields.keys()),
               "blobs": list(r.fields.values()), "error": r.error or "", "detail": r.detail}


class PackRows:
    def __init__(self, seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        out = pack_documents(list(batch["tokens"]), list(batch["mods"]), keys, self.seq_len)
        # mix rows of a window in a seeded order so a step does not see only long documents
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{self.seed}:{keys[:1]}".encode()).digest()[:8], "little")) \
            if keys else None
        if rng is not None and len(out["keys"]):
            perm = rng.permutation(len(out["keys"]))
            out = {k: v[perm] for k, v in out.items()}
        return {k: (v.astype(np.int32) if k != "keys" else v) for k, v in out.items()}


def tokenizer_resources(vocab_names: list[str], cfg: DataConfig) -> dict:
    """What one tokenizer actor asks of Ray: the most any of its modalities declares (capped at 1 CPU,
    since one actor works on one record at a time), plus the config's data resources."""
    from modalities import registry

    cpus, custom = 0.0, dict(cfg.data_resources)
    for n in vocab_names:
        res = dict(registry.get(n).resources)
        cpus = max(cpus, float(res.pop("num_cpus", 1)))
        for k, v in res.items():
            custom[k] = max(custom.get(k, 0.0), v)
    return {"num_cpus": min(cpus, 1.0), "resources": custom or None}


def build_train_stream(cfg: DataConfig, names: list[str], seed: int, ledger=None) -> ray.data.Dataset:
    shards = list_shards(cfg.train_shards)
    plan = shard_order(shards, seed, cfg.epochs)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the trainer prints its own progress; Ray's bars would interleave with it
    res = tokenizer_resources(names, cfg)
    extra = {"resources": cfg.data_resources} if cfg.data_resources else {}
    ds = ray.data.from_items([{"epoch": e, "shard": s} for e, s in plan], override_num_blocks=len(plan))
    ds = ds.map_batches(TokenizeDocs, fn_constructor_kwargs={"bundle_dir": cfg.bundle_dir, "names": names, "seed": seed,
                                                             "order": cfg.modality_order, "ledger": ledger,
                                                             "max_member_bytes": cfg.max_member_bytes,
                                                             "cache": cfg.cache_tokens},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors), batch_format="numpy",
                        num_cpus=res["num_cpus"], **({"resources": res["resources"]} if res["resources"] else {}))
    ds = ds.map_batches(PackRows, fn_constructor_kwargs={"seq_len": cfg.seq_len, "seed": seed},
                        batch_size=cfg.pack_window, compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy",
                        num_cpus=0.1, **extra)
    return ds


def local_documents(shards: list[str], vocab: Vocabulary, cfg: DataConfig, seed: int, order: str | None = None,
                    limit: int | None = None, tally: Tally | None = None):
    """Read a small shard set in this process (evaluation); yields (record, ids per modality, tokens, modality_ids).

    Bad records are skipped and counted in `tally` (errored, with reason and dead letter), never dropped silently.
    """
    exts = ext_map(vocab)
    tally = tally if tally is not None else Tally()
    n = 0
    for shard in shards:
        for r in read_shard(shard, cfg.max_member_bytes):
            out = tokenize_record(vocab, exts, r, 0, seed, order or cfg.modality_order, tally)
            if out is None:
                continue
            yield (r, *out)
            n += 1
            if limit is not None and n >= limit:
                return
