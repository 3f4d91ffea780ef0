"""The token cache: every training shard tokenized once, read as tokens by every epoch, run and resume.

    <data.token_cache>/
      cache.json                 the key: what the tokens depend on (vocabulary fingerprint, the shards
                                 with their sizes, quality filters, dedup settings, seed, input limits)
      shards/<id>.parquet        one shard's KEPT records: key, whether its parts keep their own order,
                                 each part's modality (its index in the vocabulary) and length, and
                                 the parts' local ids back to back
      shards/<id>.json           written last, so it marks the shard complete: row count, the parquet's
                                 byte size and sha256, the shard's accounting (seen / kept / filtered /
                                 errored, dead letters) and the seconds it took
      index-NNNNN.parquet        every complete shard's record together (50,000 a chunk), so a run's plan
                                 reads a few objects, not two per shard (status)

Why Parquet (through pyarrow): Ray Data and every dataframe tool read it natively, it stores ragged
integer lists without padding, compresses them, and an object store takes it as one PUT. A shard's
file appears under its final name only once complete (written to a temporary name, then renamed;
on an object store the upload is atomic), and its .json is written after it; a shard is complete
when the .json exists and the parquet has the size and hash the .json records. A build cut off by a
crash or a full disk therefore leaves shards that are either complete or visibly not, and the next
build finishes the missing ones (never reading half a file).

Dedup decisions are taken once, at tokenization, in the seeded order of epoch 0; the signatures each
kept record claimed are stored with it, so a build that is finished later re-claims them first and
the missing shards are deduplicated against the whole corpus, as in one uninterrupted build.

Token ids are stored per part (local ids), not as laid-out documents. A record of numbered parts
(KEY.<i>.<ext>) keeps its order; one of one value per modality has its order drawn per epoch, so that is
applied when the stream reads the cache, and does not key it. Layout 1 (before documents had parts) held
one column per modality; a cache written in it is recognised and rebuilt, saying so in one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from pathlib import PurePosixPath

import numpy as np

from omnistream.common.errors import UserError

from .accounting import Tally
from .config import DataConfig
from .shards import identity

FORMAT = 2  # 2: ordered parts (key, ordered, part_mods, part_lens, ids); 1: one column per modality
MANIFEST = "cache.json"
TMP = ".tmp-"  # part-files: written, then moved to their name
STALE_S = 3600  # a part-file this old is no write in progress: swept when the cache is opened
# shard errors that say the store failed, not the shard: such a shard's record says `retry`, and the next
# `data tokenize` or run reads it again rather than taking the cut-short read for the shard's contents
RETRY_REASONS = ("shard_read_failed", "shard_missing")
log = logging.getLogger(__name__)
OWN_TMP = re.compile(  # _write_atomic's names
    r"(cache\.json|index-\d{5}\.parquet|[0-9a-f]{20}\.(parquet|json))" + re.escape(TMP) + r"\d+"
)
INDEX_NAME = re.compile(r"index-\d{5}\.parquet")  # the index of completion records, in chunks
INDEX_ROWS = 50_000  # completion records per index chunk: a million shards' index is 20 reads


def shard_identity(url: str) -> list:
    """[url, size, mtime]: a shard rewritten in place (same name, other bytes) no longer matches."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except (OSError, ValueError):
        return [url, None, None]
    return identity(url, info)


def cache_key(
    cfg: DataConfig, vocab_fingerprint: str, seed: int, shards: list[str], listed: dict[str, list] | None = None
) -> dict:
    """Everything the cached tokens depend on, as plain JSON (compared field by field on reuse). `listed`:
    the shards' identities from their listing (shards.list_shards), where a remote shard's costs no HEAD."""
    listed = listed or {}
    return {
        "format": FORMAT,
        "vocab_fingerprint": vocab_fingerprint,
        "seed": seed,
        "shards": [listed.get(s) or shard_identity(s) for s in shards],
        "quality": cfg.quality,
        "dedup": cfg.dedup.model_dump(mode="json"),
        "max_member_bytes": cfg.max_member_bytes,
        "limits": cfg.limits.model_dump(mode="json"),
        # which parts and documents are kept depends on the row: a part longer than one is filtered
        "seq_len": cfg.seq_len,
        "drop_bad_parts": cfg.drop_bad_parts,
        "long_documents": cfg.long_documents,
        # the data format, where it is not the tar shards every cache before it was made from
        **({"data_format": cfg.format} if cfg.format != "webdataset" else {}),
        **({"format_options": cfg.format_options} if cfg.format_options else {}),
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def describe_key_difference(have: dict, want: dict) -> str:
    """What differs between two cache keys, in words."""
    out = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k), want.get(k)
        if a == b:
            continue
        if k == "shards":
            old = {s[0]: s for s in a or []}
            new = {s[0]: s for s in b or []}
            added, gone = sorted(set(new) - set(old)), sorted(set(old) - set(new))
            changed = sorted(u for u in set(old) & set(new) if old[u] != new[u])
            parts = [
                f"{len(x)} {w} (e.g. {x[0]})"
                for x, w in ((added, "added"), (gone, "removed"), (changed, "changed on disk"))
                if x
            ]
            out.append("shards: " + ("; ".join(parts) or "same shards in another order"))
        elif k == "vocab_fingerprint":
            out.append(f"vocabulary fingerprint {str(a)[:12]} -> {str(b)[:12]} (tokenizers refitted)")
        else:
            out.append(f"{k}: {json.dumps(a, sort_keys=True)} -> {json.dumps(b, sort_keys=True)}")
    return "; ".join(out)


class TokenCache:
    """One cache directory (a local path or an fsspec URL such as s3://bucket/cache)."""

    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.key: dict | None = None
        self.fs, self.root = fsspec.core.url_to_fs(url)

    # ---- layout ---------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    @staticmethod
    def shard_id(shard: str) -> str:
        return hashlib.sha256(shard.encode("utf-8", "surrogateescape")).hexdigest()[:20]

    def _write_atomic(self, rel: str, data: bytes) -> None:
        final = self._path(rel)
        tmp = f"{final}{TMP}{time.time_ns()}"
        self.fs.makedirs(str(PurePosixPath(final).parent), exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        except BaseException:
            try:  # a failed write leaves no part-file behind (a killed process's are swept by the next build, sweep())
                self.fs.rm(tmp)
            except OSError:
                pass
            raise

    def sweep(self) -> int:
        """Remove this cache's own part-files older than STALE_S: what writers killed mid-write left (younger
        ones may be another actor's write in progress). Done by a build that has shards to write: it lists
        shards/, a request per 1,000 files, not a cost the plan of a finished cache should pay. Only names
        this cache writes (cache.json's, the index's and a shard's, OWN_TMP) in its own two folders: a
        folder the cache is pointed at may hold other files."""
        gone = 0
        paths = []
        for folder in (self.root, self._path("shards")):
            try:
                paths += [p for p in self.fs.ls(folder, detail=False) if OWN_TMP.fullmatch(PurePosixPath(p).name)]
            except OSError:  # a folder not made yet
                continue
        for p in paths:
            try:
                if time.time() - self.fs.modified(p).timestamp() > STALE_S:
                    self.fs.rm(p)
                    gone += 1
            except (OSError, NotImplementedError):
                continue
        return gone

    # ---- the key ----------------------------------------------------------------------------------
    def manifest(self) -> dict | None:
        p = self._path(MANIFEST)
        if not self.fs.exists(p):
            return None
        try:
            return json.loads(self.fs.cat_file(p))
        except ValueError as e:
            raise UserError(
                f"token cache {self.url}: {MANIFEST} is damaged ({e}); delete the directory to rebuild"
            ) from None

    def claim(self, key: dict) -> None:
        """Make this directory the cache for `key`, or refuse a cache made under another key, saying what differs."""
        have = self.manifest()
        if have is None:  # a new cache: nothing of its own to sweep, and what is there is not its to delete
            self._write_atomic(MANIFEST, json.dumps({"key": key, "digest": key_digest(key)}, indent=1).encode())
            return
        old = have.get("key", {}).get("format")
        if isinstance(old, int) and old < key["format"]:
            _say_rebuilt(self.url, old)
            self.clear()
            self._write_atomic(MANIFEST, json.dumps({"key": key, "digest": key_digest(key)}, indent=1).encode())
            return
        if have.get("key") != key:
            what = describe_key_difference(have.get("key", {}), key)
            raise UserError(
                f"token cache {self.url} was made with other settings: {what}. "
                f"Point data.token_cache at another directory, or delete this one to rebuild it"
            )

    def clear(self) -> int:
        """Remove the cache's own files (its manifest, index and shards/<id>.parquet|json); nothing else there."""
        own = re.compile(r"[0-9a-f]{20}\.(parquet|json)")
        gone = 0
        try:
            paths = [p for p in self.fs.ls(self._path("shards"), detail=False) if own.fullmatch(PurePosixPath(p).name)]
        except OSError:
            paths = []
        try:
            paths += [p for p in self.fs.ls(self.root, detail=False) if INDEX_NAME.fullmatch(PurePosixPath(p).name)]
        except OSError:
            pass
        for p in [*paths, self._path(MANIFEST)]:
            try:
                self.fs.rm(p)
                gone += 1
            except OSError:
                continue
        return gone

    # ---- shards -----------------------------------------------------------------------------------
    def shard_meta(self, shard: str) -> dict | None:
        """The shard's completion record if the shard is complete and whole, else None."""
        sid = self.shard_id(shard)
        mp, pp = self._path("shards", sid + ".json"), self._path("shards", sid + ".parquet")
        try:
            meta = json.loads(self.fs.cat_file(mp))
            size = self.fs.size(pp)
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("shard") != shard or size != meta.get("bytes"):
            return None
        return meta

    def status(self, shards: list[str], retry_failed: bool = False) -> tuple[dict[str, dict], list[str]]:
        """({shard: meta} of the complete shards, [shards still to tokenize]); `retry_failed`: a shard whose
        read the store cut short (RETRY_REASONS) is to tokenize again, not complete.

        The completion records come from the index (index-NNNNN.parquet: every complete shard's record, in
        chunks of INDEX_ROWS), read in a few requests however many shards there are. Only shards the index
        lacks (just tokenized, or a cache from before the index) cost their own reads: one listing of
        shards/ for the sizes, then their records fetched together; the index is then rewritten with them.
        A record saying `retry` is never taken from the index (the shard may have been read again since)."""
        index = self.index()
        # on local disk a listing costs no request: every indexed shard's files are checked against it (a
        # tokens file cut or removed after the index was written makes the shard one to tokenize again); on
        # an object store the index is trusted, and a damaged tokens file is caught when read (read_shard)
        sizes = self._sizes() if index and self._local() else None
        done, todo, unknown = {}, [], []
        for s in shards:
            m = index.get(s)
            sid = self.shard_id(s)
            if m is None or m.get("retry"):
                unknown.append(s)
            elif sizes is not None and (sizes.get(f"{sid}.parquet") != m.get("bytes") or f"{sid}.json" not in sizes):
                unknown.append(s)
            else:
                done[s] = m
        fresh = self._metas(unknown, sizes)
        for s in unknown:
            if s in fresh:
                done[s] = fresh[s]
        if fresh and any(index.get(s) != m for s, m in fresh.items()):
            self.write_index({**index, **fresh})
        todo = [s for s in shards if s not in done or (retry_failed and done[s].get("retry"))]
        again = set(todo)
        done = {s: m for s, m in done.items() if s not in again}
        return done, todo

    def _local(self) -> bool:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocol or "local" in protocol

    def _sizes(self) -> dict[str, int]:
        """{file name: size} of shards/ (one listing; {} when nothing is written yet)."""
        try:
            return {PurePosixPath(e["name"]).name: e.get("size") for e in self.fs.ls(self._path("shards"), detail=True)}
        except OSError:
            return {}

    def _metas(self, shards: list[str], sizes: dict[str, int] | None = None) -> dict[str, dict]:
        """The completion records of `shards` that are complete and whole: one listing of shards/ (sizes),
        then the records fetched in one batch (fsspec's cat of many paths: concurrent on an object store)."""
        if not shards:
            return {}
        sizes = self._sizes() if sizes is None else sizes
        if not sizes:
            return {}
        want = {}
        for s in shards:
            sid = self.shard_id(s)
            if f"{sid}.json" in sizes and f"{sid}.parquet" in sizes:
                want[self._path("shards", sid + ".json")] = (s, sizes[f"{sid}.parquet"])
        if not want:
            return {}
        got = self.fs.cat(list(want), on_error="omit")
        out = {}
        for path, data in got.items():
            s, size = want.get(path) or want.get(self.fs._strip_protocol(path), (None, None))
            try:
                meta = json.loads(data)
            except ValueError:
                continue
            if s is not None and isinstance(meta, dict) and meta.get("shard") == s and size == meta.get("bytes"):
                out[s] = meta
        return out

    def index(self) -> dict[str, dict]:
        """{shard: completion record} of the index's chunks (one listing of the cache's folder, one read each)."""
        import pyarrow.parquet as pq

        try:
            names = sorted(
                p for p in self.fs.ls(self.root, detail=False) if INDEX_NAME.fullmatch(PurePosixPath(p).name)
            )
        except OSError:
            return {}
        out: dict[str, dict] = {}
        for p in names:
            try:
                t = pq.read_table(io.BytesIO(self.fs.cat_file(p))).to_pydict()
            except (OSError, ValueError) as e:  # a damaged chunk costs its shards' own reads, not the run
                log.warning(
                    "token cache %s: index chunk %s is unreadable (%s); reading its shards' records", self.url, p, e
                )
                continue
            for shard, meta in zip(t["shard"], t["meta"]):
                out[shard] = json.loads(meta)
        return out

    def write_index(self, metas: dict[str, dict]) -> None:
        """Write the index of these completion records (what `status` reads), each chunk atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shards = sorted(metas)
        n = 0
        for n, a in enumerate(range(0, len(shards), INDEX_ROWS)):
            part = shards[a : a + INDEX_ROWS]
            buf = io.BytesIO()
            table = pa.table({"shard": part, "meta": [json.dumps(metas[s]) for s in part]})
            pq.write_table(table, buf, compression="zstd")
            self._write_atomic(f"index-{n:05d}.parquet", buf.getvalue())
        keep = {f"index-{i:05d}.parquet" for i in range(n + 1 if shards else 0)}
        try:
            extra = [p for p in self.fs.ls(self.root, detail=False) if INDEX_NAME.fullmatch(PurePosixPath(p).name)]
        except OSError:
            extra = []
        for p in extra:
            if PurePosixPath(p).name not in keep:
                self.fs.rm(p)

    def write_shard(
        self,
        shard: str,
        names: list[str],
        keys: list[str],
        docs: list[tuple[bool, list]],
        claims: list[str] | None,
        tally: Tally,
        seconds: float,
    ) -> dict:
        """Write one shard's kept records, then its completion record. `docs`: per record (ordered, its parts
        [(modality, local ids)] in order); `names`: the vocabulary's modalities (a part stores its index)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        index = {n: i for i, n in enumerate(names)}
        part_mods = [np.array([index[n] for n, _ in parts], np.int8) for _, parts in docs]
        part_lens = [np.array([len(ids) for _, ids in parts], np.int32) for _, parts in docs]
        flat = [
            np.concatenate([np.asarray(ids, np.int32) for _, ids in parts]) if parts else np.zeros(0, np.int32)
            for _, parts in docs
        ]
        cols = {
            "key": pa.array(keys, pa.string()),
            "ordered": pa.array([bool(o) for o, _ in docs], pa.bool_()),
            "part_mods": pa.array(part_mods, pa.list_(pa.int8())),
            "part_lens": pa.array(part_lens, pa.list_(pa.int32())),
            "ids": pa.array(flat, pa.list_(pa.int32())),
        }
        if claims is not None:
            cols["claims"] = pa.array(claims, pa.string())
        buf = io.BytesIO()
        pq.write_table(pa.table(cols), buf, compression="zstd")
        data = buf.getvalue()
        sid = self.shard_id(shard)
        self._write_atomic(f"shards/{sid}.parquet", data)
        ids = sum(len(f) for f in flat)
        meta = {
            "shard": shard,
            "rows": len(keys),
            "ids": int(ids),
            # the documents' tokens: <bos>, <eos>, and each part's ids within its begin/end markers
            "tokens": int(ids + 2 * len(keys) + 2 * sum(len(p) for p in part_lens)),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "tally": tally.to_json(),
            "seconds": round(seconds, 3),
        }
        if any(e["reason"] in RETRY_REASONS for e in tally.shard_errors):
            meta["retry"] = True
        self._write_atomic(f"shards/{sid}.json", json.dumps(meta).encode())
        return meta

    def read_shard(self, shard: str, meta: dict | None = None, columns: list[str] | None = None):
        """The shard's table; its bytes are checked against the completion record (a file cut or
        changed after it was written is an error naming it, never half-read)."""
        import pyarrow.parquet as pq

        meta = meta or self.shard_meta(shard)
        if meta is None:
            raise UserError(
                f"token cache {self.url}: shard {shard} is missing or incomplete; "
                f"run `omnistream data tokenize` (or train) to finish the cache"
            )
        data = self.fs.cat_file(self._path("shards", self.shard_id(shard) + ".parquet"))
        if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise UserError(
                f"token cache {self.url}: the tokens of {shard} are damaged "
                f"({len(data)} bytes, {meta['bytes']} written); delete that shard's files (and, on an object "
                f"store, {self.url}/index-*.parquet) to rebuild it"
            )
        return pq.read_table(io.BytesIO(data), columns=columns)

    def documents(self, shard: str) -> CachedDocuments:
        """The shard's kept records as flat arrays (CachedDocuments), for the row stream."""
        return CachedDocuments(self.read_shard(shard, columns=list(DOC_COLUMNS)))

    def tally(self, shards: list[str], metas: dict[str, dict] | None = None) -> Tally:
        """The accounting of the cached shards, as the tokenization pass counted it (from `metas`, the
        completion records `status` returned, when given: one read of each per run, not one per use)."""
        t = Tally()
        for s in shards:
            m = metas.get(s) if metas is not None else self.shard_meta(s)
            if m is not None:
                t.add(Tally.from_json(m["tally"]))
        return t


DOC_COLUMNS = ("key", "ordered", "part_mods", "part_lens", "ids")


class CachedDocuments:
    """One cached shard's records as flat numpy arrays (no Python object per token): record i's parts are
    its (modality index, local ids) pairs, read by `parts(i, names)`."""

    def __init__(self, table):
        def flat(col: str):
            a = table.column(col).combine_chunks()
            return a.offsets.to_numpy(), a.values.to_numpy(zero_copy_only=False)

        self.keys = table.column("key").to_pylist()
        self.ordered = table.column("ordered").to_numpy(zero_copy_only=False)
        (self.p_off, self.p_mod), (_, self.p_len) = flat("part_mods"), flat("part_lens")
        self.i_off, self.ids = flat("ids")

    def __len__(self) -> int:
        return len(self.keys)

    def parts(self, i: int, names: list[str]) -> list[tuple[str, np.ndarray]]:
        a, b = self.p_off[i], self.p_off[i + 1]
        at, out = self.i_off[i], []
        for m, n in zip(self.p_mod[a:b], self.p_len[a:b]):
            out.append((names[m], self.ids[at : at + n]))
            at += n
        return out


def open_cache(
    cfg: DataConfig, vocab_fingerprint: str, seed: int, shards: list[str], listed: dict | None = None
) -> TokenCache:
    """The token cache for these settings, claimed for their key.

    data.token_cache = "auto": token_cache/<key digest>/ next to the tokenizer bundle, one directory per
    key, so a run with other shards or filters makes its own cache beside the old one. A path or URL
    named explicitly holds one cache: made under another key it is refused, saying what differs.
    """
    key = cache_key(cfg, vocab_fingerprint, seed, shards, listed)
    if cfg.token_cache == "auto":
        url = str(PurePosixPath(cfg.bundle_dir.rstrip("/")).parent / "token_cache" / key_digest(key))
        _rebuild_layout_1(cfg, key, url)
    else:
        url = cfg.token_cache
    cache = TokenCache(url)
    cache.claim(key)
    cache.key = key
    return cache


def _rebuild_layout_1(cfg: DataConfig, key: dict, url: str) -> None:
    """data.token_cache = "auto": a cache of the same shards and tokenizers written in an older layout (one
    column per modality) lies beside this one under another digest. It is said in one line, and removed, as
    this one is built in its place."""
    parent = TokenCache(str(PurePosixPath(url).parent))
    try:
        siblings = parent.fs.ls(parent.root, detail=False)
    except OSError:  # no cache made here yet
        return
    for d in siblings:
        old = TokenCache(parent.fs.unstrip_protocol(d) if "://" in url else d)
        try:
            have = (old.manifest() or {}).get("key", {})
        except UserError:
            continue
        same = have.get("shards") == key["shards"] and have.get("vocab_fingerprint") == key["vocab_fingerprint"]
        if same and isinstance(have.get("format"), int) and have["format"] < FORMAT:
            _say_rebuilt(old.url, have["format"], url)
            old.clear()
            try:
                old.fs.rm(old.root, recursive=True)
            except OSError:
                pass


def _say_rebuilt(url: str, old: int, at: str = "") -> None:
    log.warning(
        "token cache %s was written in layout %d (one column per modality, before documents had ordered parts): "
        "rebuilding it in layout %d%s",
        url,
        old,
        FORMAT,
        f" at {at}" if at else "",
    )
