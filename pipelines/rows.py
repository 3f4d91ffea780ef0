"""The training rows, read from the token cache, with a data position that costs O(1) to restore.

    windows (driver)       the seeded shard plan of every epoch, cut into packing windows of
                           data.pack_window documents (data.mix.window with a token mixture), each
                           a list of (plan index, first document, end) ranges; computed from the
                           cache's per-shard document counts, without reading a token
      .map_batches(WindowRows)   read the window's documents from the cache, lay them out (the
                                 modality order is drawn per epoch and record), pack them into rows
      .map_batches(Positions)    number the rows: `pos` is the row's place in the global stream
      .repartition(R rows, strict)   blocks of R = micro_batch_size × grad_accum rows: one rank's
                                 share of one optimizer step

Ray Train hands the blocks to the ranks in turn (OrderedSplit, cluster/train.py): at a step, the
ranks together take the next world × R rows of the global stream, rank r the r-th block. The order
of the global stream does not depend on the number of ranks, so a checkpoint's position - the global
row count, and the window and row of the last row consumed - resumes on any number of ranks: the
stream restarts at that window (never opening a shard fully consumed before it), packs it again,
checks that its last consumed row has the hash the checkpoint recorded, and drops the rows up to it.
A resume therefore re-reads at most one window of documents, at step 100 or step 100 000.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
from omnistream.common.errors import DataResumeMismatch
from omnistream.modalities.vocab import Vocabulary

from .accounting import row_hash
from .cache import TokenCache
from .config import DataConfig
from .context import data_context
from .documents import make_document, record_rng
from .stream import RETRIES, PackRows

ROW_COLUMNS = ("win", "row", "pos")  # beside packing.COLUMNS and "keys"



@dataclass
class StreamStart:
    """Where a (resumed) stream begins: after row `row` of window `window`; `position` rows were consumed."""
    window: int = 0
    row: int = -1
    row_hash: str = ""
    position: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def plan_windows(plan: list[tuple[int, str]], docs: dict[str, int], size: int) -> list[list[list[int]]]:
    """Cut the plan's documents, in order, into windows of `size` documents (the last may be shorter)."""
    windows, cur, n = [], [], 0
    for i, (_, shard) in enumerate(plan):
        a, total = 0, docs[shard]
        while a < total:
            take = min(size - n, total - a)
            cur.append([i, a, a + take])
            n, a = n + take, a + take
            if n == size:
                windows.append(cur)
                cur, n = [], 0
    if cur:
        windows.append(cur)
    return windows


def window_size(cfg: DataConfig) -> int:
    return cfg.mix.window if cfg.mix.on else cfg.pack_window


def stream_settings(cfg: DataConfig, seed: int, mix_rows: int, cache_digest: str) -> dict:
    """What the row stream depends on beyond the cache; a resume under other settings is refused."""
    s = {"token_cache": cache_digest, "seed": seed, "seq_len": cfg.seq_len, "window": window_size(cfg),
         "modality_order": cfg.modality_order, "mix": cfg.mix.model_dump(mode="json")}
    if cfg.mix.on:
        s["mix_rows"] = mix_rows
    return s


class WindowRows:
    """Ray Data actor: one window (its document ranges) -> its packed rows, with `win` and `row` per row."""

    def __init__(self, url: str, bundle_dir: str, modalities: dict[str, dict], cfg: DataConfig, seed: int,
                 plan: list[tuple[int, str]], mix_rows: int, start: dict | None = None, ledger=None):
        self.vocab = Vocabulary.load(bundle_dir, modalities)
        self.names = list(self.vocab.names)
        self.cache, self.cfg, self.seed, self.plan = TokenCache(url), cfg, seed, plan
        self.pack = PackRows(cfg.seq_len, seed, mix_rows, cfg.mix, self.names, ledger)
        self.start = StreamStart(**start) if start else None
        self.ledger = ledger
        self.tables: OrderedDict[str, tuple] = OrderedDict()  # the last few shards read, as flat arrays

    def _shard(self, shard: str) -> tuple:
        if shard not in self.tables:
            t = self.cache.read_shard(shard, columns=["key", *self.names])
            cols = {}
            for n in self.names:
                a = t.column(n).combine_chunks()
                cols[n] = (a.offsets.to_numpy(), a.values.to_numpy(zero_copy_only=False),
                           a.is_null().to_numpy(zero_copy_only=False))
            self.tables[shard] = (t.column("key").to_pylist(), cols)
            while len(self.tables) > 4:
                self.tables.popitem(last=False)
        return self.tables[shard]

    def documents(self, ranges: list[list[int]]):
        for pi, a, b in ranges:
            epoch, shard = self.plan[pi]
            keys, cols = self._shard(shard)
            for i in range(a, b):
                parts = {n: v[o[i]:o[i + 1]] for n, (o, v, null) in cols.items() if not null[i]}
                t, m = make_document(self.vocab, parts, self.cfg.modality_order, record_rng(self.seed, epoch, keys[i]))
                yield f"{epoch}:{shard}:{keys[i]}", t.astype(np.int32), m.astype(np.int8)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k = int(batch["window"][0])
        docs = list(self.documents(json.loads(str(batch["ranges"][0]))))
        out = self.pack([d[0] for d in docs], [d[1] for d in docs], [d[2] for d in docs])
        n = len(out["keys"])
        out["win"] = np.full(n, k, dtype=np.int64)
        out["row"] = np.arange(n, dtype=np.int64)
        s = self.start
        if s is not None and k == s.window and s.row >= 0:
            if s.row >= n or row_hash(out["keys"][s.row]) != s.row_hash:
                raise DataResumeMismatch(
                    f"the stream rebuilt from the token cache differs from the one the checkpoint consumed (window "
                    f"{k}, row {s.row}): the token cache or the packing changed since, so resuming would repeat or "
                    f"skip records")
            # the records read again to restore the position: the whole window, packed again (packing needs
            # all of it), however far into it the checkpoint fell; its rows up to the last consumed are dropped
            replayed = len(docs)
            if self.ledger is not None:
                self.ledger.set_metrics.remote({"data/resume/replayed_records": replayed,
                                                "data/resume/replayed_rows": s.row + 1})
            out = {c: v[s.row + 1:] for c, v in out.items()}
        return out


class Positions:
    """Ray Data actor (one, in order): numbers the rows of the global stream from `start`."""

    def __init__(self, start: int):
        self.next = start

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["keys"])
        batch["pos"] = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        return batch


def build_train_stream(cfg: DataConfig, modalities: dict[str, dict], seed: int, url: str,
                       plan: list[tuple[int, str]], windows: list, unit_rows: int, mix_rows: int,
                       start: StreamStart | None = None, ledger=None):
    """The training rows from window `start.window` on, in blocks of `unit_rows` rows."""
    import ray

    start = start or StreamStart()
    data_context()  # the trainer logs its own progress
    items = [{"window": k, "ranges": json.dumps(w)} for k, w in enumerate(windows) if k >= start.window]
    if not items:
        items = [{"window": len(windows), "ranges": "[]"}]  # a stream that was already consumed to its end
    extra = {"resources": cfg.data_resources} if cfg.data_resources else {}
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4096))
    ds = ds.map_batches(WindowRows, fn_constructor_kwargs={
        "url": url, "bundle_dir": cfg.bundle_dir, "modalities": modalities, "cfg": cfg, "seed": seed, "plan": plan,
        "mix_rows": mix_rows, "start": start.to_json(), "ledger": ledger},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.packers), batch_format="numpy", num_cpus=0.25,
        **RETRIES, **extra)
    # One actor, its tasks run in the order they were submitted, and never restarted: a restart would
    # number rows from the start again (the Trainer's order check would stop the run; the run then
    # retries from its checkpoint)
    ds = ds.map_batches(Positions, fn_constructor_kwargs={"start": start.position}, batch_size=None,
                        compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy", num_cpus=0,
                        max_restarts=0, allow_out_of_order_execution=False, **extra)
    return ds.repartition(target_num_rows_per_block=unit_rows, strict=True)
