"""Records -> documents: the stages every path shares.

    RecordProcessor   reads shards (records.py), decodes each field with its modality, filters
                      (quality.py), dedups (dedup.py), encodes; every record's outcome is accounted.
                      Run by the tokenizer actors that fill the token cache (tokenize.py), by
                      `omnistream data inspect` (record_stream, accounting only) and in-process
                      for evaluation (local_documents)
    make_document     one record's ids per modality -> one document, modalities in a seeded order
    PackRows          a window of documents -> packed rows (packing.py), or mixed batches (mixing.py)

The training rows are made from the token cache by rows.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import ray

from omnistream.modalities import registry
from omnistream.modalities.base import BadSample
from omnistream.modalities.vocab import Vocabulary

from .accounting import Tally
from .config import DataConfig
from .dedup import Deduper, signatures, start_dedup
from .mixing import MixConfig, mix_pack
from .packing import pack_documents
from .quality import build_filters
from .records import RawRecord, read_shard
from .shards import list_shards, shard_order

@dataclass
class Outcome:
    """What became of one record."""
    status: str                      # "kept" | "filtered" | "errored"
    reason: str = ""
    field: str = ""
    detail: str = ""
    parts: dict | None = None        # local ids per modality (kept records, when encoding)
    modalities: tuple = ()           # the modalities the record carries
    claims: str | None = None        # the dedup signatures a kept record claimed (JSON), kept in the token cache


def _errored(e: BadSample, carries: tuple) -> "Outcome":
    return Outcome("errored", e.reason, getattr(e, "field", ""), e.detail[:200], modalities=carries)


def ext_map(mods) -> dict[str, str]:
    return registry.check_keys([m.name for m in mods])


def decode_fields(mods: dict, exts: dict[str, str], fields: dict[str, bytes]) -> dict[str, object]:
    """modality name -> decoded object, for the fields some modality reads. Raises BadSample."""
    objs: dict[str, object] = {}
    for ext, data in fields.items():
        name = exts.get(ext)
        if name is None:
            continue
        if name in objs:
            raise BadSample("duplicate_modality", f"two fields for {name!r} (.{ext})")
        objs[name] = guarded(mods[name].decode_bytes, name, "decode_bytes", ext, data, field=ext)
    if not objs:
        raise BadSample("no_readable_field", f"fields {sorted(fields)} match no installed modality")
    return objs


def guarded(fn, modality: str, what: str, *args, field: str = ""):
    """Call a plugin's method for one record. BadSample passes through; anything else it raises (a bug
    in a plugin, an object it did not expect) becomes BadSample("plugin_error:<Type>") for this record
    alone: no exception from one record ends a stream (docs/architecture.md, Errors)."""
    try:
        return fn(*args)
    except BadSample as e:
        e.field = getattr(e, "field", "") or field
        raise
    except Exception as e:
        bad = BadSample(f"plugin_error:{type(e).__name__}", f"{modality}.{what}: {e}")
        bad.field = field
        raise bad from e


def record_rng(seed: int, epoch: int, key: str) -> random.Random:
    # a key holds whatever bytes the tar's member name had (surrogate-escaped): hash those bytes
    return random.Random(hashlib.sha256(f"{seed}:{epoch}:{key}".encode("utf-8", "surrogateescape")).digest())


def make_document(vocab: Vocabulary, parts: dict[str, np.ndarray], order: str, rng: random.Random | None):
    """Lay out one document from each modality's local ids; returns (tokens, modality_ids)."""
    names = [n for n in vocab.names if n in parts]
    if order == "random" and rng is not None:
        rng.shuffle(names)  # both directions (image→text and text→image) get learned
    return vocab.document([(n, parts[n]) for n in names])


class RecordProcessor:
    """Read -> decode -> quality filters -> dedup -> encode, with every record's outcome accounted.

    Used as a Ray Data actor by the training stream (bundle given: documents out) and by
    `omnistream data inspect` (no bundle: only the accounting), and in-process for evaluation.
    """

    def __init__(self, modalities: dict[str, dict] | None, bundle_dir: str | None, cfg: DataConfig, seed: int,
                 dedup_shards: list | None = None, ledger=None):
        """`modalities` (the config's, with options) must match the bundle; None takes the bundle's as they are."""
        if bundle_dir:
            self.vocab = Vocabulary.load(bundle_dir, modalities)
            mods = self.vocab.modalities
        else:
            self.vocab = None
            mods = [registry.build(n, o) for n, o in modalities.items()]
        self.mods = {m.name: m for m in mods}
        self.exts = ext_map(mods)
        self.filters = build_filters(self.mods, cfg.quality)
        self.cfg, self.seed, self.ledger = cfg, seed, ledger
        self.deduper = Deduper(dedup_shards, cfg.dedup) if dedup_shards else None
        # data.limits.member_bytes is per modality: applied to each of its keys (extensions)
        self.ext_bytes = {e: cfg.limits.member_bytes[n] for e, n in self.exts.items() if n in cfg.limits.member_bytes}

    # ---- outcomes ---------------------------------------------------------------------------------
    def quality_reason(self, objs: dict[str, object]) -> str | None:
        """The first failed quality check over a record's decoded fields (Modality.quality_reason), or None."""
        for name, obj in objs.items():
            f = self.filters[name]
            check = getattr(self.mods[name], "quality_reason", None)
            if f.enabled and check is not None:
                reason = guarded(check, name, "quality_reason", obj, f)
                if reason:
                    return reason
        return None

    def outcomes(self, records: list[RawRecord]) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(records)
        claims: dict[int, str] = {}
        pending: list[tuple[int, dict]] = []
        for i, r in enumerate(records):
            carries = tuple(sorted({self.exts[e] for e in r.fields if e in self.exts}))
            try:
                if r.error:
                    raise BadSample(r.error, r.detail)
                objs = decode_fields(self.mods, self.exts, r.fields)
                reason = self.quality_reason(objs)
            except BadSample as e:
                out[i] = _errored(e, carries)
                continue
            if reason:
                out[i] = Outcome("filtered", reason, modalities=carries)
                continue
            pending.append((i, objs))
        if self.deduper is not None and pending:
            sigs, signed = [], []
            for i, objs in pending:
                try:
                    sigs.append((f"{records[i].shard}:{records[i].key}",
                                 guarded(signatures, "dedup", "near_signatures", records[i], objs, set(self.exts),
                                         self.mods, self.filters, self.cfg.dedup)))
                    signed.append((i, objs))
                except BadSample as e:
                    out[i] = _errored(e, tuple(sorted(objs)))
            dups = self.deduper.duplicates(sigs) if sigs else []
            pending = []
            for (i, objs), dup, (_, sig) in zip(signed, dups, sigs):
                if dup:
                    out[i] = Outcome("filtered", dup, modalities=tuple(sorted(objs)))
                else:
                    pending.append((i, objs))
                    claims[i] = json.dumps(sig)
        for i, objs in pending:
            try:
                parts = ({n: guarded(self.mods[n].encode, n, "encode", o) for n, o in objs.items()}
                         if self.vocab is not None else None)
            except BadSample as e:
                out[i] = _errored(e, tuple(sorted(objs)))
                continue
            out[i] = Outcome("kept", parts=parts, modalities=tuple(sorted(objs)), claims=claims.get(i))
        return out

    def process(self, shards: Iterable[tuple[int, str]], tally: Tally, chunk: int = 256):
        """Yield (epoch, record, outcome) for every record of the shards, accounting each in `tally`."""
        for epoch, shard in shards:
            buf: list[RawRecord] = []
            held = 0  # bytes of the buffered records: decoded at `chunk` records or data.limits.buffer_bytes
            for r in read_shard(shard, self.cfg.max_member_bytes, self.cfg.limits, self.ext_bytes):
                if not r.key:  # the shard itself failed (unreadable, or cut between records)
                    tally.shard_error(r.shard, r.error, r.detail)
                    continue
                buf.append(r)
                held += sum(len(v) for v in r.fields.values())
                if len(buf) >= chunk or held >= self.cfg.limits.buffer_bytes:
                    yield from self._account(epoch, buf, tally)
                    buf, held = [], 0
            yield from self._account(epoch, buf, tally)

    def _account(self, epoch: int, records: list[RawRecord], tally: Tally):
        for r, o in zip(records, self.outcomes(records)):
            tally.count(r.shard, r.key, o)
            yield epoch, r, o

    # ---- Ray Data entry point -------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tally = Tally()
        keys, toks, mods = [], [], []
        plan = [(int(e), str(s)) for e, s in zip(batch["epoch"], batch["shard"])]
        for epoch, r, o in self.process(plan, tally):
            if o.status != "kept" or self.vocab is None:
                continue
            t, m = make_document(self.vocab, o.parts, self.cfg.modality_order, record_rng(self.seed, epoch, r.key))
            keys.append(f"{epoch}:{r.shard}:{r.key}")
            toks.append(t.astype(np.int32))
            mods.append(m.astype(np.int8))
        if self.ledger is not None:  # waited for: a shard whose tally did not arrive is one whose actor died
            ray.get(self.ledger.add.remote(tally, ",".join(f"{e}:{s}" for e, s in plan)))
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
    """A window of documents -> packed rows (first-fit decreasing), or, with a token mixture configured,
    -> batches of `rows` rows whose token shares meet the targets (mixing.py). A pure function of the
    window: a resumed run that packs the window again gets the same rows."""

    def __init__(self, seq_len: int, seed: int, rows: int = 1, mix: MixConfig | None = None,
                 names: list[str] | None = None, ledger=None):
        self.seq_len, self.seed, self.rows, self.ledger = seq_len, seed, rows, ledger
        self.mix = mix if mix is not None and mix.on else None
        self.names = list(names or [])
        self.target = np.array([self.mix.shares.get(n, 0.0) for n in self.names]) if self.mix else None

    def __call__(self, keys: list[str], tokens: list[np.ndarray], mods: list[np.ndarray]) -> dict[str, np.ndarray]:
        if self.mix is not None:
            out, dropped, n_docs = mix_pack(tokens, mods, keys, self.seq_len, self.rows, self.target, self.mix.tolerance)
            if self.ledger is not None and n_docs:
                t = Tally()
                t.mix_dropped = n_docs
                t.mix_dropped_tokens.update({n: int(c) for n, c in zip(self.names, dropped) if c})
                self.ledger.add.remote(t, f"mix:{keys[0]}")
        else:
            out = pack_documents(tokens, mods, keys, self.seq_len)
            # mix rows of a window in a seeded order so a step does not see only long documents
            if len(out["keys"]):
                seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{keys[:1]}".encode()).digest()[:8], "little")
                perm = np.random.default_rng(seed).permutation(len(out["keys"]))
                out = {k: v[perm] for k, v in out.items()}
        return {k: (v.astype(np.int32) if k != "keys" else v) for k, v in out.items()}


# Ray Data restarts a dead actor and retries its task without end by default: a record that kills its
# actor (out of memory, a crash in a decoder library) would hang the run. Two restarts, two retries.
RETRIES = {"max_restarts": 2, "max_task_retries": 2}
ACTOR_DIED = "actor_died"


def shards_may_die(ds: ray.data.Dataset) -> ray.data.Dataset:
    """A pass over shards, one shard a task, that goes on when a shard kills its actor every time it is
    tried (RETRIES): Ray Data drops that task's block (max_errored_blocks) and the caller, which knows
    which shards reported back, errors the missing ones as shards (`lost_shard`). Only for passes whose
    output is accounted per shard; the training row stream never drops a block."""
    ds.context.max_errored_blocks = -1
    logging.getLogger("ray.data._internal.execution.streaming_executor_state").addFilter(_DroppedBlockFilter())
    return ds


class _DroppedBlockFilter(logging.Filter):
    """Ray Data logs each dropped block with its traceback; the shard is reported in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Ignoring this exception" not in record.getMessage()

    def __eq__(self, other) -> bool:  # added once per logger, however many passes run
        return isinstance(other, _DroppedBlockFilter)

    __hash__ = logging.Filter.__hash__


def lost_shard(shard: str, tally: Tally, what: str = "") -> None:
    tries = 1 + RETRIES["max_task_retries"]
    tally.shard_error(shard, ACTOR_DIED, f"the actor reading this shard died each of the {tries} times it was "
                                         f"tried (killed for memory, or a crash in a decoder library); none of "
                                         f"its records is used{what}")


def processor_options(cfg: DataConfig, modalities: dict[str, dict]) -> dict:
    """How one RecordProcessor actor asks Ray for resources: the most any of its modalities declares
    (capped at 1 CPU: one actor works on one record at a time), plus the config's data resources."""
    cpus, custom = 0.0, dict(cfg.data_resources)
    for n in modalities:
        res = dict(registry.get(n).resources)
        cpus = max(cpus, float(res.pop("num_cpus", 1)))
        for k, v in res.items():
            custom[k] = max(custom.get(k, 0.0), v)
    opts = {"num_cpus": min(cpus, 1.0)}
    if custom:
        opts["resources"] = custom
    return opts


def record_stream(cfg: DataConfig, modalities: dict[str, dict], seed: int, plan: list[tuple[int, str]],
                  bundle_dir: str | None, ledger=None) -> ray.data.Dataset:
    """(epoch, shard) plan -> RecordProcessor actors: documents when a bundle is given, else accounting only."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the trainer prints its own progress; Ray's bars would interleave with it
    shards = start_dedup(cfg.dedup)
    ds = ray.data.from_items([{"epoch": e, "shard": s} for e, s in plan], override_num_blocks=max(1, len(plan)))
    return ds.map_batches(RecordProcessor, fn_constructor_kwargs={
        "modalities": modalities, "bundle_dir": bundle_dir, "cfg": cfg, "seed": seed,
        "dedup_shards": shards, "ledger": ledger},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors), batch_format="numpy",
        **RETRIES, **processor_options(cfg, modalities))


def local_documents(shards: list[str], bundle_dir: str, modalities: dict[str, dict] | None, cfg: DataConfig,
                    seed: int, limit: int | None = None, tally: Tally | None = None):
    """Read a small shard set in this process (evaluation); yields (record, ids per modality, tokens, modality_ids).

    Bad and filtered records are skipped and counted in `tally`, never dropped silently. No dedup here.
    """
    proc = RecordProcessor(modalities, bundle_dir, cfg, seed)  # no dedup actors: no dedup
    tally = tally if tally is not None else Tally()
    n = 0
    for epoch, r, o in proc.process([(0, s) for s in shards], tally):
        if o.status != "kept":
            continue
        t, m = make_document(proc.vocab, o.parts, cfg.modality_order, record_rng(seed, epoch, r.key))
        yield r, o.parts, t, m
        n += 1
        if limit is not None and n >= limit:
            return
