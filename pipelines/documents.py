"""Records -> documents, in whatever process calls it (no Ray here: the trainer's evaluation reads its
held-out shards with it, and the tokenizer actors run the same code inside Ray Data).

    RecordProcessor   reads shards (records.py), decodes each field with its modality, filters
                      (quality.py), dedups (dedup.py, when given its actors), encodes; every record's
                      outcome is accounted
    make_document     one record's ids per modality -> one document, modalities in a seeded order
    local_documents   a small shard set read in this process (evaluation)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from omnistream.common.errors import BadSample
from omnistream.modalities import registry
from omnistream.modalities.vocab import Vocabulary

from .accounting import Tally
from .config import DataConfig
from .formats import ReadBounds, reader
from .packing import pack_documents
from .quality import build_filters
from .records import RawRecord


@dataclass
class Outcome:
    """What became of one record."""

    status: str  # "kept" | "filtered" | "errored"
    reason: str = ""
    field: str = ""
    detail: str = ""
    parts: dict | None = None  # local ids per modality (kept records, when encoding)
    modalities: tuple = ()  # the modalities the record carries
    claims: str | None = None  # the dedup signatures a kept record claimed (JSON), kept in the token cache


@dataclass
class _Prepared:
    """A modality's input held for batched encoding (RecordProcessor._encode_batched)."""

    value: object


def _errored(e: BadSample, carries: tuple) -> Outcome:
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

    def __init__(
        self,
        modalities: dict[str, dict] | None,
        bundle_dir: str | None,
        cfg: DataConfig,
        seed: int,
        dedup_shards: list | None = None,
        ledger=None,
    ):
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
        self.deduper = None
        if dedup_shards:
            from .dedup import (
                Deduper,  # Ray actors: only where the processor runs inside Ray
            )

            self.deduper = Deduper(dedup_shards, cfg.dedup)
        # data.limits.member_bytes is per modality: applied to each of its keys (extensions)
        self.ext_bytes = {e: cfg.limits.member_bytes[n] for e, n in self.exts.items() if n in cfg.limits.member_bytes}
        self.reader, self.bounds = reader(cfg.format), ReadBounds.of(cfg, self.ext_bytes)

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
        """Each record is decoded, checked, signed for dedup and encoded before the next is decoded: only
        one record's decoded objects are held at a time (a 21 KB PNG can decode to 48 MB of pixels, and a
        chunk is up to 256 records). Dedup then decides over the chunk's signatures in one call."""
        if self.deduper is not None:  # Ray actors: only where the processor runs inside Ray
            from .dedup import signatures

        out: list[Outcome | None] = [None] * len(records)
        pending: list[tuple[int, dict | None, tuple, dict | None]] = []  # (i, parts, carries, signature)
        for i, r in enumerate(records):
            carries = tuple(sorted({self.exts[e] for e in r.fields if e in self.exts}))
            try:
                if r.error:
                    raise BadSample(r.error, r.detail)
                objs = decode_fields(self.mods, self.exts, r.fields)
                reason = self.quality_reason(objs)
                if reason:
                    out[i] = Outcome("filtered", reason, modalities=carries)
                    continue
                carries = tuple(sorted(objs))
                sig = (
                    guarded(
                        signatures,
                        "dedup",
                        "near_signatures",
                        r,
                        objs,
                        set(self.exts),
                        self.mods,
                        self.filters,
                        self.cfg.dedup,
                    )
                    if self.deduper is not None
                    else None
                )
                parts = self._parts(objs, batched=True)
            except BadSample as e:
                out[i] = _errored(e, carries)
                continue
            finally:
                objs = None  # the decoded pixels and samples go before the next record is decoded
            pending.append((i, parts, carries, sig))
        self._encode_batched(pending, records, out, carries_of={i: c for i, _, c, _ in pending})
        pending = [t for t in pending if out[t[0]] is None]
        dups = (
            self.deduper.duplicates([(f"{records[i].shard}:{records[i].key}", sig) for i, _, _, sig in pending])
            if self.deduper is not None and pending
            else [None] * len(pending)
        )
        for (i, parts, carries, sig), dup in zip(pending, dups):
            if dup:
                out[i] = Outcome("filtered", dup, modalities=carries)
            else:
                out[i] = Outcome(
                    "kept", parts=parts, modalities=carries, claims=json.dumps(sig) if sig is not None else None
                )
        return out

    def _parts(self, objs: dict, batched: bool = False) -> dict | None:
        """What a kept record carries on: each modality's local ids (None without a bundle: accounting only).
        With `batched`, a modality that encodes many at once (`prepare` + `encode_many`, the learned image
        tokenizer) gives only its prepared input here, small enough to hold for a chunk (64×64×3 bytes of
        pixels, not the decoded photo); `_encode_batched` encodes the chunk's in one pass per modality."""
        if self.vocab is None:
            return None
        parts = {}
        for n, o in objs.items():
            m = self.mods[n]
            if batched and hasattr(m, "encode_many") and hasattr(m, "prepare"):
                parts[n] = _Prepared(guarded(m.prepare, n, "prepare", o))
            else:
                parts[n] = guarded(m.encode, n, "encode", o)
        return parts

    def _encode_batched(self, pending: list, records: list, out: list, carries_of: dict, batch: int = 64) -> None:
        """Replace each _Prepared part of `pending` by its ids, `batch` at a time per modality. A batch that
        fails is encoded one by one, so the error is the one record's (errored), not its neighbours'."""
        for name, m in self.mods.items():
            todo = [(i, parts) for i, parts, _, _ in pending if parts and isinstance(parts.get(name), _Prepared)]
            for k in range(0, len(todo), batch):
                chunk = todo[k : k + batch]
                try:
                    ids = guarded(m.encode_many, name, "encode", [parts[name].value for _, parts in chunk])
                except BadSample:
                    ids = []
                    for i, parts in chunk:
                        try:
                            ids.append(guarded(m.encode_many, name, "encode", [parts[name].value])[0])
                        except BadSample as e:
                            out[i] = _errored(e, carries_of[i])
                            ids.append(None)
                for (_, parts), one in zip(chunk, ids):
                    if one is not None:
                        parts[name] = one

    def process(self, shards: Iterable[tuple[int, str]], tally: Tally, chunk: int = 256):
        """Yield (epoch, record, outcome) for every record of the shards, accounting each in `tally`."""
        for epoch, shard in shards:
            buf: list[RawRecord] = []
            held = 0  # bytes of the buffered records: decoded at `chunk` records or data.limits.buffer_bytes
            for r in self.reader.read(shard, self.bounds):
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
            # members no modality reads (KEY.json is the record's labels): counted, never passed over unsaid
            tally.unconsumed.update(
                e if _PLAIN_EXT.fullmatch(e) else "other" for e in r.fields if e not in self.exts and e != "json"
            )
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
            import ray

            ray.get(self.ledger.add.remote(tally, ",".join(f"{e}:{s}" for e, s in plan)))
        out_t = np.empty(len(toks), dtype=object)
        out_m = np.empty(len(mods), dtype=object)
        out_t[:], out_m[:] = toks, mods
        return {"key": np.array(keys, dtype=object), "tokens": out_t, "mods": out_m}


_PLAIN_EXT = re.compile(r"[a-z0-9_-]{1,16}")  # an extension fit to name a metric; others count as "other"


def local_documents(
    shards: list[str],
    bundle_dir: str,
    modalities: dict[str, dict] | None,
    cfg: DataConfig,
    seed: int,
    limit: int | None = None,
    tally: Tally | None = None,
):
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


def labels(raw: bytes | None) -> dict:
    """A held-out record's labels: the scalar fields of its KEY.json object; {} for none, or for JSON that
    cannot be read (`"[" * 100000` nests past the parser's recursion limit: RecursionError, not
    ValueError), so one record's JSON never fails an evaluation (on every worker, at every retry)."""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}


def held_out(cfg) -> dict:
    """A run's held-out set, read in this process (what training/evaluate.py's Evaluator is handed): the
    first `eval.examples` kept records of `data.eval_shards` as (key, the labels of its KEY.json, local ids
    per modality), their documents packed into rows for the loss, and what became of every record read
    (a Tally). `cfg` is the run config."""
    tally, records, docs = Tally(), [], []
    for r, ids, toks, mods in local_documents(
        cfg.data.eval_shards,
        cfg.data.bundle_dir,
        cfg.modalities,
        cfg.data,
        cfg.seed,
        limit=cfg.eval.examples,
        tally=tally,
    ):
        records.append((r.key, labels(r.fields.get("json")), ids))
        docs.append((toks, mods, r.key))
    rows = pack_documents(*map(list, zip(*docs)), cfg.data.seq_len) if docs else {}
    return {"records": records, "rows": rows, "tally": tally}
