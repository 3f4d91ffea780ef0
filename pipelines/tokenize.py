"""Tokenize once: the training shards -> the token cache (cache.py), on Ray.

`omnistream data tokenize CONFIG` runs this ahead of training; `omnistream train` runs it first when
the cache is missing or unfinished, and skips it when the cache is complete. Shards already in the
cache are not read again; one missing shard costs its own tokenization, not the corpus's.

Each shard goes whole to one `ShardTokenizer` actor (RecordProcessor: read, decode, quality filters,
dedup, encode; every record accounted), which writes the shard's kept records and accounting to the
cache. Shards are taken in the seeded order of epoch 0, so the dedup decisions (who came first) are
the ones a run without a cache would have made.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import ray

from omnistream.common import logs
from omnistream.common.errors import ErrorRateExceeded, UserError
from omnistream.modalities.vocab import Vocabulary

from .accounting import Tally
from .cache import TokenCache
from .config import DataConfig
from .context import data_context
from .dedup import Deduper, start_dedup
from .documents import RecordProcessor
from .ledger import DataLedger
from .shards import list_shards, shard_order
from .stream import RETRIES, lost_shard, processor_options, shards_may_die

log = logging.getLogger(__name__)

RECLAIM_CHUNK = 2000  # records per round trip to the dedup actors when re-claiming cached shards


class ShardTokenizer:
    """Ray Data actor: one shard in, its kept records written to the token cache, a summary row out."""

    def __init__(
        self,
        modalities: dict[str, dict],
        bundle_dir: str,
        cfg: DataConfig,
        seed: int,
        url: str,
        dedup_shards: list,
        ledger=None,
    ):
        self.proc = RecordProcessor(modalities, bundle_dir, cfg, seed, dedup_shards)
        self.names = list(self.proc.vocab.names)
        self.cache, self.ledger, self.dedup = TokenCache(url), ledger, bool(dedup_shards)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for shard in batch["shard"]:
            shard = str(shard)
            try:
                rows.append((shard, *self.tokenize(shard), ""))
            except Exception as e:  # noqa: BLE001 - not a record's fault (those are caught per record): the
                # cache could not be written, say. Returned, not raised, so the pass (which drops the blocks
                # of shards that kill their actor) stops on it instead of skipping it
                rows.append((shard, 0, 0, "", f"{type(e).__name__}: {e}"))
        return {
            "shard": np.array([r[0] for r in rows], dtype=object),
            "seen": np.array([r[1] for r in rows]),
            "kept": np.array([r[2] for r in rows]),
            "meta": np.array([r[3] for r in rows], dtype=object),  # the completion record, for the index
            "error": np.array([r[4] for r in rows], dtype=object),
        }

    def tokenize(self, shard: str) -> tuple[int, int, str]:
        t0 = time.perf_counter()
        tally = Tally()
        keys: list[str] = []
        docs: list[tuple[bool, list]] = []
        claims: list[str] | None = [] if self.dedup else None
        for _, r, o in self.proc.process([(0, shard)], tally):
            if o.status != "kept":
                continue
            keys.append(r.key)
            docs.append((o.ordered, o.parts))
            if claims is not None:
                claims.append(o.claims or "[]")
        meta = self.cache.write_shard(shard, self.names, keys, docs, claims, tally, time.perf_counter() - t0)
        if self.ledger is not None:
            self.ledger.add.remote(tally, shard)
        return tally.seen, tally.kept, json.dumps(meta)


def reclaim(cache: TokenCache, shards: list[str], dedup_shards: list, cfg: DataConfig) -> int:
    """Replay the signatures the cached shards' kept records claimed, in order, into fresh dedup actors,
    so the shards still to tokenize are deduplicated against them. Returns the records re-claimed."""
    deduper, n = Deduper(dedup_shards, cfg.dedup), 0
    for s in shards:
        t = cache.read_shard(s, columns=["key", "claims"]).to_pydict()
        items = [(f"{s}:{k}", [tuple(x) for x in json.loads(c)]) for k, c in zip(t["key"], t["claims"])]
        for i in range(0, len(items), RECLAIM_CHUNK):
            deduper.duplicates(items[i : i + RECLAIM_CHUNK])
        n += len(items)
    return n


def build_cache(
    cfg: DataConfig,
    modalities: dict[str, dict],
    seed: int,
    cache: TokenCache,
    progress: bool = True,
    shards: list[str] | None = None,
) -> dict:
    """Finish (or build) the token cache of the training shards (cache.open_cache); returns what was done.

    Raises ErrorRateExceeded when too many of the first records are unreadable (the wrong data).
    """
    from tqdm import tqdm

    shards = shards if shards is not None else list_shards(cfg.train_shards)  # listed once by the planner
    url = cache.url
    done, todo = cache.status(shards, retry_failed=True)
    summary = {
        "url": url,
        "shards": len(shards),
        "already_cached": len(done),
        "tokenized": 0,
        "records": 0,
        "seconds": 0.0,
        "reclaimed": 0,
    }
    if not todo:
        return summary
    cache.sweep()  # what writers killed mid-write left, before this build writes beside it
    t0 = time.perf_counter()
    order = [s for _, s in shard_order(shards, seed, 1)]
    pending = set(todo)
    dedup = start_dedup(cfg.dedup)
    if dedup and done:
        summary["reclaimed"] = reclaim(cache, [s for s in order if s in done], dedup, cfg)
    ledger = DataLedger.remote(cfg.max_error_rate, cfg.error_rate_window)
    data_context()  # one bar of our own, in shards
    todo = [s for s in order if s in pending]
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo)).map_batches(
        ShardTokenizer,
        fn_constructor_kwargs={
            "modalities": modalities,
            "bundle_dir": cfg.bundle_dir,
            "cfg": cfg,
            "seed": seed,
            "url": url,
            "dedup_shards": dedup,
            "ledger": ledger,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.tokenizer_actors, len(todo))),
        batch_format="numpy",
        **RETRIES,
        **processor_options(cfg, modalities),
    )
    finished, written = set(), {}
    with tqdm(
        total=len(todo), desc=f"{logs.TAG} tokenizing shards into the token cache", unit="shard", disable=not progress
    ) as bar:
        for b in shards_may_die(ds).iter_batches(batch_size=1, batch_format="numpy"):
            for shard, err, meta in zip(b["shard"], b["error"], b["meta"]):
                if err:
                    raise RuntimeError(f"tokenizing {shard} into the token cache {url} failed: {err}")
                finished.add(str(shard))
                written[str(shard)] = json.loads(meta)
            summary["tokenized"] += len(b["shard"])
            summary["records"] += int(b["seen"].sum())
            bar.update(len(b["shard"]))
            reason = ray.get(ledger.stop_reason.remote())
            if reason:
                raise ErrorRateExceeded(reason)
    names = list(Vocabulary.load(cfg.bundle_dir, modalities).names) if len(finished) < len(todo) else []
    for shard in todo:
        if shard not in finished:  # recorded, so the cache is complete and every run reads the same rows
            tally = Tally()
            lost_shard(
                shard,
                tally,
                f" (recorded in the token cache: delete {cache.url}/shards/"
                f"{cache.shard_id(shard)}.json and {cache.url}/index-*.parquet to try it again)",
            )
            written[shard] = cache.write_shard(shard, names, [], [], [] if dedup else None, tally, 0.0)
            ledger.add.remote(tally, shard)
            summary["tokenized"] += 1
            log.warning("%s: %s", shard, tally.shard_errors[0]["detail"])
    # every completion record in one index: the next plan reads it, not two objects per shard
    cache.write_index({**done, **written})  # status read the index: `done` holds what it had
    reason = ray.get(ledger.stop_reason.remote(True))
    if reason:
        raise ErrorRateExceeded(reason)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def require_data(cache: TokenCache, shards: list[str], metas: dict[str, dict] | None = None) -> Tally:
    """The cache's accounting; a corpus of which no record could be kept is a UserError saying why."""
    tally = cache.tally(shards, metas)
    if tally.kept == 0:
        why = ", ".join(f"{k} ({v})" for k, v in (tally.errored + tally.filtered).most_common(3)) or "no records"
        errs = "; ".join(f"{e['shard']}: {e['reason']}" for e in tally.shard_errors[:3])
        raise UserError(
            f"no training record could be kept from {len(shards)} shards ({tally.seen} records read: "
            f"{why}{'; ' + errs if errs else ''})"
        )
    return tally
