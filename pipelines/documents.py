"""Records -> documents, in whatever process calls it (no Ray here: the trainer's evaluation reads its
held-out shards with it, and the tokenizer actors run the same code inside Ray Data).

    RecordProcessor   reads shards (records.py), decodes each part with its modality (a document's
                      KEY.<i>.<ext> parts, or one value per modality), filters (quality.py), dedups
                      (dedup.py, when given its actors), encodes; every record's outcome is accounted,
                      a bad part named (or, under data.drop_bad_parts, dropped and counted)
    make_document     one record's parts -> one document: its own order, or (one value per modality)
                      the config's or a seeded one; with the offsets a long document may be split at
    local_documents   a small shard set read in this process (evaluation)
    held_out          the run's held-out set, read until every eval task has its examples
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
from .records import RawRecord, part_ext


@dataclass
class Outcome:
    """What became of one record."""

    status: str  # "kept" | "filtered" | "errored"
    reason: str = ""
    field: str = ""
    detail: str = ""
    parts: list | None = None  # [(modality, local ids)] in document order (kept records, when encoding)
    ordered: bool = False  # the parts' order is the record's own (KEY.<i>.<ext>); else drawn per epoch
    modalities: tuple = ()  # the modalities the record carries
    claims: str | None = None  # the dedup signatures a kept record claimed (JSON), kept in the token cache
    part_mods: tuple = ()  # the modality of each part kept, in order (kept records)
    dropped: tuple = ()  # (modality, reason) of each part dropped under data.drop_bad_parts
    long: bool = False  # a kept document longer than a row: split at part boundaries when packed


@dataclass
class _Pending:
    """A record decoded and encoded (or being encoded) whose outcome is not decided yet (RecordProcessor)."""

    i: int  # its place in the chunk
    parts: list | None  # [field, modality, local ids or _Prepared] (None: accounting only)
    names: list  # the modality of each part, in order
    sig: list | None  # its dedup signatures
    ordered: bool
    dropped: list  # (modality, reason) of the parts dropped
    long: bool = False  # longer than a row (set by RecordProcessor._fits)

    @property
    def carries(self) -> tuple:
        return tuple(sorted(set(self.names)))


@dataclass
class _Prepared:
    """A modality's input held for batched encoding (RecordProcessor._encode_batched)."""

    value: object


def _errored(e: BadSample, carries: tuple, key: str = "") -> Outcome:
    """An errored record; a part's error names the part (`doc7.2.txt: ...`)."""
    f = getattr(e, "field", "")
    detail = f"{key}.{f}: {e.detail}" if key and f else e.detail
    return Outcome("errored", e.reason, f, detail[:200], modalities=carries)


class _PartFiltered(Exception):
    """A part that failed its modality's quality checks (the record is filtered, or the part dropped)."""

    def __init__(self, reason: str, field_name: str):
        super().__init__(reason)
        self.reason, self.field = reason, field_name


def ext_map(mods) -> dict[str, str]:
    return registry.check_keys([m.name for m in mods])


def modality_fields(exts: dict[str, str], fields) -> tuple[bool, list[tuple[str, str]]]:
    """The fields of a record some modality reads, as (field, modality) in document order, and whether the
    order is the record's own. Parts `KEY.<i>.<ext>` come in the order of `i` (ordered); one value per
    modality (`KEY.txt`, `KEY.jpg`) comes in field order, its document order drawn later (not ordered).
    Raises BadSample for a record that mixes the two layouts, or numbers two parts alike."""
    plain, numbered = [], []
    for f in fields:
        i, ext = part_ext(f)
        name = exts.get(ext)
        if name is None:
            continue
        (plain if i is None else numbered).append((i, f, name))
    if plain and numbered:
        raise BadSample(
            "mixed_layout",
            f"numbered parts ({numbered[0][1]}) beside one value per modality ({plain[0][1]}): a record is "
            f"one or the other",
        )
    if not numbered:
        return False, [(f, n) for _, f, n in plain]
    numbered.sort(key=lambda t: t[0])
    for (a, fa, _), (b, fb, _) in zip(numbered, numbered[1:]):
        if a == b:
            raise BadSample("duplicate_part", f"two parts numbered {a} ({fa}, {fb})")
    return True, [(f, n) for _, f, n in numbered]


def decode_part(mods: dict, name: str, field_name: str, data: bytes):
    return guarded(mods[name].decode_bytes, name, "decode_bytes", part_ext(field_name)[1], data, field=field_name)


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


def make_document(
    vocab: Vocabulary, parts: list, ordered: bool, order: str, rng: random.Random | None, cfg_dropout: float = 0.0
):
    """Lay out one document from its parts [(modality, local ids)]; returns (tokens, modality_ids, cuts).

    A record's own parts (`ordered`) keep their order. One value per modality is laid out in the config's
    order, or, with data.modality_order = "random", in an order drawn per record and epoch, so that both
    directions (image→text and text→image) get learned. With data.cfg_dropout, a document of several parts
    is, at that rate (drawn per record and epoch, after its order), its last part alone: the target without
    its condition, what classifier-free guidance contrasts with (0 draws nothing: the stream is as before).
    `cuts` are the offsets where a part begins after the first: the only places a document longer than a
    row may be split (packing.py)."""
    parts = list(parts)
    if not ordered:
        parts.sort(key=lambda p: vocab.modality_index(p[0]))
        if order == "random" and rng is not None:
            rng.shuffle(parts)
    if cfg_dropout > 0 and rng is not None and len(parts) > 1 and rng.random() < cfg_dropout:
        parts = parts[-1:]
    toks, mods = vocab.document(parts)
    cuts = 1 + np.cumsum([len(ids) + 2 for _, ids in parts[:-1]], dtype=np.int64)
    return toks, mods, cuts


def document_length(parts: list) -> int:
    """Tokens of a document: <bos>, each part within its begin/end markers, <eos>."""
    return 2 + sum(len(ids) + 2 for _, ids in parts)


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
        self.reader, self.bounds = reader(cfg.format, cfg.format_options), ReadBounds.of(cfg, self.ext_bytes)

    # ---- outcomes ---------------------------------------------------------------------------------
    def part_quality(self, name: str, obj) -> str | None:
        """The failed quality check of one decoded part (Modality.quality_reason), or None."""
        f = self.filters[name]
        check = getattr(self.mods[name], "quality_reason", None)
        if f.enabled and check is not None:
            return guarded(check, name, "quality_reason", obj, f) or None
        return None

    def carries(self, r: RawRecord) -> tuple:
        return tuple(sorted({self.exts[e] for e in (part_ext(f)[1] for f in r.fields) if e in self.exts}))

    def _decoded(self, r: RawRecord) -> tuple[bool, list, list]:
        """(ordered, [(field, modality, decoded object)], [(modality, reason)] dropped) of one record. A part
        that cannot be decoded, or fails its modality's quality checks, ends the record (BadSample, or
        _PartFiltered naming the part), unless data.drop_bad_parts drops just that part, counted."""
        ordered, which = modality_fields(self.exts, r.fields)
        if not which:
            raise BadSample("no_readable_field", f"fields {sorted(r.fields)} match no installed modality")
        if len(which) > self.cfg.limits.parts:
            raise BadSample("too_many_parts", f"{len(which)} parts > data.limits.parts = {self.cfg.limits.parts}")
        if not ordered:
            names = [n for _, n in which]
            if len(set(names)) != len(names):
                dup = next(n for n in names if names.count(n) > 1)
                raise BadSample(
                    "duplicate_modality", f"two fields for {dup!r} ({', '.join(f for f, n in which if n == dup)})"
                )
        objs, dropped, first_bad = [], [], None
        for f, n in which:
            try:
                obj = decode_part(self.mods, n, f, r.fields[f])
                reason = self.part_quality(n, obj)
                if reason:
                    raise _PartFiltered(reason, f)
            except (BadSample, _PartFiltered) as e:
                e.field = getattr(e, "field", "") or f
                if not self.cfg.drop_bad_parts:
                    raise
                first_bad = first_bad or e
                dropped.append((n, e.reason))
                continue
            objs.append((f, n, obj))
        if not objs:  # nothing left of the record: it is its first bad part's
            raise first_bad
        return ordered, objs, dropped

    def outcomes(self, records: list[RawRecord]) -> list[Outcome]:
        """Each record is decoded, checked, signed for dedup and encoded before the next is decoded: only
        one record's decoded objects are held at a time (a 21 KB PNG can decode to 48 MB of pixels, and a
        chunk is up to 256 records). Dedup then decides over the chunk's signatures in one call."""
        if self.deduper is not None:  # Ray actors: only where the processor runs inside Ray
            from .dedup import signatures

        out: list[Outcome | None] = [None] * len(records)
        pending: list[_Pending] = []
        for i, r in enumerate(records):
            carries = self.carries(r)
            try:
                if r.error:
                    raise BadSample(r.error, r.detail)
                ordered, objs, dropped = self._decoded(r)
                carries = tuple(sorted({n for _, n, _ in objs}))
                sig = (
                    guarded(
                        signatures,
                        "dedup",
                        "near_signatures",
                        r,
                        [(n, o) for _, n, o in objs],
                        {f for f, _, _ in objs},
                        self.mods,
                        self.filters,
                        self.cfg.dedup,
                    )
                    if self.deduper is not None
                    else None
                )
                parts = self._parts(objs, batched=True)
                names = [n for _, n, _ in objs]
            except _PartFiltered as e:
                out[i] = Outcome("filtered", e.reason, e.field, f"{r.key}.{e.field}: {e.reason}", modalities=carries)
                continue
            except BadSample as e:
                out[i] = _errored(e, carries, r.key)
                continue
            finally:
                objs = None  # the decoded pixels and samples go before the next record is decoded
            pending.append(_Pending(i, parts, names, sig, ordered, dropped))
        self._encode_batched(pending, out, records)
        pending = [p for p in pending if out[p.i] is None and self._fits(p, records, out)]
        dups = (
            self.deduper.duplicates([(f"{records[p.i].shard}:{records[p.i].key}", p.sig) for p in pending])
            if self.deduper is not None and pending
            else [None] * len(pending)
        )
        for p, dup in zip(pending, dups):
            if dup:
                out[p.i] = Outcome("filtered", dup, modalities=p.carries)
                continue
            out[p.i] = Outcome(
                "kept",
                parts=[(n, ids) for _, n, ids in p.parts] if p.parts is not None else None,
                ordered=p.ordered,
                modalities=p.carries,
                claims=json.dumps(p.sig) if p.sig is not None else None,
                part_mods=tuple(p.names),
                dropped=tuple(p.dropped),
                long=p.long,
            )
        return out

    def _fits(self, p: _Pending, records: list, out: list) -> bool:
        """A part longer than a row is filtered (or, under data.drop_bad_parts, dropped); a document longer
        than a row is kept, to be split at part boundaries (p.long), or filtered under data.long_documents =
        "drop"."""
        if p.parts is None or self.vocab is None:  # accounting only, or fit features: no ids to measure
            return True
        key, room = records[p.i].key, self.cfg.seq_len - 4  # the part, its markers, and <bos>/<eos> beside it
        too_long = [(f, n, ids) for f, n, ids in p.parts if len(ids) > room]
        if too_long and (not self.cfg.drop_bad_parts or len(too_long) == len(p.parts)):
            f, n, ids = too_long[0]
            out[p.i] = Outcome(
                "filtered",
                "part_longer_than_row",
                f,
                f"{key}.{f}: {len(ids)} {n} ids + 4 > data.seq_len = {self.cfg.seq_len}",
                modalities=p.carries,
            )
            return False
        if too_long:
            p.parts = [x for x in p.parts if len(x[2]) <= room]
            p.names = [n for _, n, _ in p.parts]
            p.dropped.extend((n, "part_longer_than_row") for _, n, _ in too_long)
        n_tok = document_length([(n, ids) for _, n, ids in p.parts])
        p.long = n_tok > self.cfg.seq_len
        if p.long and self.cfg.long_documents == "drop":
            out[p.i] = Outcome(
                "filtered",
                "document_longer_than_row",
                "",
                f"{key}: {n_tok} tokens > data.seq_len = {self.cfg.seq_len} (data.long_documents = drop)",
                modalities=p.carries,
            )
            return False
        return True

    def _parts(self, objs: list, batched: bool = False) -> list | None:
        """What a kept record carries on: each part's [field, modality, local ids] (None without a bundle:
        accounting only). With `batched`, a modality that encodes many at once (`prepare` + `encode_many`, the
        learned image tokenizer) gives only its prepared input here, small enough to hold for a chunk
        (64×64×3 bytes of pixels, not the decoded photo); `_encode_batched` encodes the chunk's in one pass
        per modality."""
        if self.vocab is None:
            return None
        parts = []
        for f, n, o in objs:
            m = self.mods[n]
            if batched and hasattr(m, "encode_many") and hasattr(m, "prepare"):
                parts.append([f, n, _Prepared(guarded(m.prepare, n, "prepare", o, field=f))])
            else:
                parts.append([f, n, guarded(m.encode, n, "encode", o, field=f)])
        return parts

    def _encode_batched(self, pending: list, out: list, records: list, batch: int = 64) -> None:
        """Replace each _Prepared part of `pending` by its ids, `batch` at a time per modality. A batch that
        fails is encoded one by one, so the error is the one record's (errored), not its neighbours'."""
        for name, m in self.mods.items():
            todo = [
                (t.i, p, t.carries)
                for t in pending
                if t.parts
                for p in t.parts
                if p[1] == name and isinstance(p[2], _Prepared)
            ]
            for k in range(0, len(todo), batch):
                chunk = todo[k : k + batch]
                try:
                    ids = guarded(m.encode_many, name, "encode", [p[2].value for _, p, _ in chunk])
                except BadSample:
                    ids = []
                    for i, p, carries in chunk:
                        try:
                            ids.append(guarded(m.encode_many, name, "encode", [p[2].value], field=p[0])[0])
                        except BadSample as e:
                            if out[i] is None:
                                out[i] = _errored(e, carries, records[i].key)
                            ids.append(None)
                for (_, p, _), one in zip(chunk, ids):
                    if one is not None:
                        p[2] = one

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
                e if _PLAIN_EXT.fullmatch(e) else "other"
                for e in (part_ext(f)[1] for f in r.fields)
                if e not in self.exts and e != "json"
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
            t, m, _ = make_document(
                self.vocab, o.parts, o.ordered, self.cfg.modality_order, record_rng(self.seed, epoch, r.key)
            )
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
    """Read a small shard set in this process (evaluation); yields (record, its Outcome, tokens, modality_ids,
    cuts) for each kept record, `limit` at most.

    Bad and filtered records are skipped and counted in `tally`, never dropped silently. No dedup here.
    """
    proc = RecordProcessor(modalities, bundle_dir, cfg, seed)  # no dedup actors: no dedup
    tally = tally if tally is not None else Tally()
    n = 0
    for epoch, r, o in proc.process([(0, s) for s in shards], tally):
        if o.status != "kept":
            continue
        t, m, cuts = make_document(proc.vocab, o.parts, o.ordered, cfg.modality_order, record_rng(seed, epoch, r.key))
        yield r, o, t, m, cuts
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


def held_out(cfg, wanted: dict | None = None) -> dict:
    """A run's held-out set, read in this process (what training/evaluate.py's Evaluator is handed).

    `wanted`: per eval task, a test of a held-out record ({"key", "labels", "parts", "ordered"}) saying whether
    the task can score it. Records are read in file order until every task has `eval.examples` records it
    wants and the loss has its first `eval.examples` (so a task whose prompt modality is rare, or comes late
    in the shard, still gets its examples); a task that the shards cannot give that many gets what there is
    (`counts` says how many). Returns {"records": [record dicts], "rows": the first `eval.examples` records'
    documents packed into rows for the loss, "tally": what became of every record read, "counts": records
    per task}. `cfg` is the run config."""
    wanted = wanted or {}
    n = cfg.eval.examples
    tally, records, docs = Tally(), [], []
    counts = {t: 0 for t in wanted}
    for r, o, toks, mods, cuts in local_documents(
        cfg.data.eval_shards, cfg.data.bundle_dir, cfg.modalities, cfg.data, cfg.seed, tally=tally
    ):
        rec = {"key": r.key, "labels": labels(r.fields.get("json")), "parts": o.parts, "ordered": o.ordered}
        takers = [t for t, want in wanted.items() if counts[t] < n and want(rec)]
        for t in takers:
            counts[t] += 1
        if len(docs) < n:
            docs.append((toks, mods, r.key, cuts))
        if takers or len(records) < n:
            records.append(rec)
        if len(docs) >= n and all(c >= n for c in counts.values()):
            break
    rows = {}
    if docs:
        tokens, mods, keys, cuts = map(list, zip(*docs))
        rows = pack_documents(tokens, mods, keys, cfg.data.seq_len, cuts)
    return {"records": records, "rows": rows, "tally": tally, "counts": counts}
