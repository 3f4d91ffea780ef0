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

Ray Train hands the blocks to the ranks in turn (OrderedSplit, cluster/split.py): at a step, the
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
from typing import TYPE_CHECKING

import numpy as np

from omnistream.common.errors import DataResumeMismatch
from omnistream.common.stream import row_hash
from omnistream.modalities.vocab import Vocabulary

from .cache import CachedDocuments, TokenCache
from .config import DataConfig
from .context import data_context
from .documents import make_document, record_rng
from .sources import Interleave, resume_items
from .stream import RETRIES, PackRows

if TYPE_CHECKING:
    from .plan import StreamPlan

ROW_COLUMNS = ("win", "row", "pos")  # beside packing.COLUMNS and "keys"


@dataclass
class StreamStart:
    """Where a (resumed) stream begins: after row `row` of window `window`; `position` rows were consumed."""

    window: int = 0
    row: int = -1
    row_hash: str = ""
    position: int = 0
    state: dict | None = None  # named sources: the interleaving state after that row (pipelines/sources.py)

    def to_json(self) -> dict:
        return asdict(self)


class WindowRows:
    """Ray Data actor: one window (its document ranges) -> its packed rows, with `win` and `row` per row."""

    def __init__(
        self,
        url: str,
        bundle_dir: str,
        modalities: dict[str, dict],
        cfg: DataConfig,
        seed: int,
        plan: list[tuple[int, str]],
        mix_rows: int,
        start: dict | None = None,
        ledger=None,
        sources: list[tuple[str, list]] | None = None,
        skip: dict | None = None,
    ):
        """`sources` (named sources, pipelines/sources.py): each source's (cache url, plan), in place of `url`
        and `plan`; a window item then names its source (`src`), a resumed stream gives `skip` ({window: [row,
        row hash]}: the rows up to that row of that window were consumed) in place of `start`, and an empty
        window is one marker row (row -1) so that the interleaving sees it arrive."""
        self.vocab = Vocabulary.load(bundle_dir, modalities)
        self.names = list(self.vocab.names)
        self.cfg, self.seed = cfg, seed
        self.caches = [TokenCache(u) for u, _ in sources] if sources else [TokenCache(url)]
        self.plans = [p for _, p in sources] if sources else [plan]
        self.pack = PackRows(cfg.seq_len, seed, mix_rows, cfg.mix, self.names, ledger)
        self.start = StreamStart(**start) if start else None
        # (source, window) -> [row, row hash]: that window's rows up to that row were consumed
        self.skip = {tuple(map(int, k.split(":"))): v for k, v in (skip or {}).items()}
        if self.start is not None and self.start.row >= 0:
            self.skip[(0, self.start.window)] = [self.start.row, self.start.row_hash]
        self.marker = sources is not None
        self.ledger = ledger
        self.tables: OrderedDict[tuple, CachedDocuments] = OrderedDict()  # the last few shards read, as flat arrays

    def _shard(self, src: int, shard: str) -> CachedDocuments:
        if (src, shard) not in self.tables:
            self.tables[(src, shard)] = self.caches[src].documents(shard)
            while len(self.tables) > 4:
                self.tables.popitem(last=False)
        return self.tables[(src, shard)]

    def documents(self, ranges: list[list[int]], src: int = 0):
        for pi, a, b in ranges:
            epoch, shard = self.plans[src][pi]
            docs = self._shard(src, shard)
            for i in range(a, b):
                key = docs.keys[i]
                t, m, cuts = make_document(
                    self.vocab,
                    docs.parts(i, self.names),
                    bool(docs.ordered[i]),
                    self.cfg.modality_order,
                    record_rng(self.seed, epoch, key),
                    self.cfg.cfg_dropout,
                )
                yield f"{epoch}:{shard}:{key}", t.astype(np.int32), m.astype(np.int8), cuts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k = int(batch["window"][0])
        src = int(batch["src"][0]) if "src" in batch else 0
        docs = list(self.documents(json.loads(str(batch["ranges"][0])), src))
        out = self.pack([d[0] for d in docs], [d[1] for d in docs], [d[2] for d in docs], [d[3] for d in docs])
        n = len(out["keys"])
        out["win"] = np.full(n, k, dtype=np.int64)
        out["row"] = np.arange(n, dtype=np.int64)
        if (src, k) in self.skip:
            last, want = self.skip[(src, k)]
            if last >= n or row_hash(out["keys"][last]) != want:
                raise DataResumeMismatch(
                    f"the stream rebuilt from the token cache differs from the one the checkpoint consumed (window "
                    f"{k}, row {last}): the token cache or the packing changed since, so resuming would repeat or "
                    f"skip records"
                )
            # the records read again to restore the position: the whole window, packed again (packing needs
            # all of it), however far into it the checkpoint fell; its rows up to the last consumed are dropped
            replayed = len(docs)
            if self.ledger is not None:
                self.ledger.add_metrics.remote(
                    {"data/resume/replayed_records": replayed, "data/resume/replayed_rows": last + 1}
                )
            out = {c: v[last + 1 :] for c, v in out.items()}
        if self.marker and not len(out["keys"]):
            out = {
                c: (np.zeros((1,) + v.shape[1:], v.dtype) if c != "keys" else np.array([""], dtype=object))
                for c, v in out.items()
            }
            out.update(win=np.array([k], np.int64), row=np.array([-1], np.int64))
        if self.marker:
            out["src"] = np.full(len(out["keys"]), src, dtype=np.int64)
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


def build_train_stream(
    cfg: DataConfig,
    modalities: dict[str, dict],
    seed: int,
    plan: StreamPlan,
    unit_rows: int,
    mix_rows: int,
    start: StreamStart | None = None,
    ledger=None,
):
    """The training rows of a planned stream (plan.plan_stream) from `start` on, in blocks of `unit_rows`
    rows. Named sources (plan.mixed) resume from `start.state`, the interleaving state."""
    import ray

    start = start or StreamStart()
    data_context()  # the trainer logs its own progress
    extra = {"resources": cfg.data_resources} if cfg.data_resources else {}
    mixed, windows = plan.mixed, plan.windows
    kwargs = {
        "url": plan.url,
        "bundle_dir": cfg.bundle_dir,
        "modalities": modalities,
        "cfg": cfg,
        "seed": seed,
        "plan": plan.plan,
        "mix_rows": mix_rows,
        "start": start.to_json(),
        "ledger": ledger,
    }
    if mixed:
        items, skip = resume_items(mixed.items, start.state)
        kwargs.update(start=None, sources=mixed.caches, skip=skip)
    else:
        items = [{"window": k, "ranges": json.dumps(w)} for k, w in enumerate(windows) if k >= start.window]
    if not items:
        items = [{"window": len(windows), "ranges": "[]", **({"src": 0} if mixed else {})}]  # consumed to its end
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4096))
    ds = ds.map_batches(
        WindowRows,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.packers),
        batch_format="numpy",
        num_cpus=0.25,
        **RETRIES,
        **extra,
    )
    # One actor, its tasks run in the order they were submitted, and never restarted: a restart would
    # number rows from the start again (the Trainer's order check would stop the run; the run then
    # retries from its checkpoint)
    if mixed:
        stage, args = (
            Interleave,
            {
                "sources": mixed.configs,
                "windows": mixed.windows,
                "rows_per_step": mixed.rows_per_step,
                "unit": mix_rows if cfg.mix.on else 1,
                "start": {"position": start.position, **(start.state or {})},
            },
        )
    else:
        stage, args = Positions, {"start": start.position}
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs=args,
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_format="numpy",
        num_cpus=0,
        max_restarts=0,
        allow_out_of_order_execution=False,
        **extra,
    )
    return ds.repartition(target_num_rows_per_block=unit_rows, strict=True)
