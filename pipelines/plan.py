"""The plan of a training stream: every source's token cache filled, then the row stream laid out.

    sources = open_sources(cfg.data, vocab.fingerprint, seed)   # each source's shards and its cache, claimed
    fill_caches(sources, cfg.modalities, seed)                  # tokenize what each cache lacks (Ray)
    plan = plan_stream(cfg.data, sources, seed, steps, rows_per_step, micro_batch_size)

`omnistream train` (cluster/driver.py) and `omnistream data tokenize` (cli/data.py) both fill the caches
through `fill_caches`; the driver hands the `StreamPlan` to `rows.build_train_stream` and the Trainer.
Nothing here starts a Ray Data pipeline: it reads the caches' completion records (per-shard document and
token counts) and computes.

One source (data.train_shards): its epochs of seeded shard order, cut into packing windows. Named sources
(data.sources): each source's epochs (as many as train.steps can take at its largest share), its windows,
and the order to read every source's windows in (sources.submission_order), which the Interleave actor
deals out by token share.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

from omnistream.common.errors import ErrorRateExceeded, UserError

from .accounting import Tally
from .cache import TokenCache, key_digest, open_cache
from .config import DataConfig
from .formats import reader
from .shards import list_shards, shard_order
from .sources import SourceConfig, largest_share, submission_order
from .tokenize import build_cache, require_data

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One source of the stream: its data settings, shards and token cache; `fill_caches` adds the rest."""

    name: str
    config: SourceConfig
    data: DataConfig  # the data section it is tokenized under (its own filters, limits, cache)
    shards: list[str]
    cache: TokenCache
    named: bool = False  # one of data.sources (not data.train_shards)
    built: dict = field(default_factory=dict)  # what filling its cache did (tokenize.build_cache's summary)
    done: dict = field(default_factory=dict)  # shard -> completion record
    tally: Tally | None = None  # the cache's accounting of its records


@dataclass
class Interleaving:
    """Named sources: what the Interleave actor and the window readers need."""

    names: list[str]
    caches: list[tuple[str, list]]  # per source (cache url, (epoch, shard) plan)
    configs: list[dict]  # per source its SourceConfig, as JSON
    windows: list[int]  # windows planned per source
    items: list[dict]  # every window {src, window, ranges}, in reading order
    rows_per_step: int  # the global batch in rows the schedule counts steps in


@dataclass
class StreamPlan:
    """The row stream of a run, planned: what `rows.build_train_stream` builds and a resume must match."""

    settings: dict  # what the stream depends on beyond its position (stream_settings)
    tally: Tally  # every source's accounting together
    per_source: dict[str, Tally]  # by source name ("train" for data.train_shards)
    url: str = ""  # one source: its cache, (epoch, shard) plan and windows
    plan: list = field(default_factory=list)
    windows: list = field(default_factory=list)
    mixed: Interleaving | None = None


def source_data(cfg: DataConfig, name: str, src: SourceConfig) -> DataConfig:
    """The DataConfig one source is tokenized under: its shards, its quality filters and limits over the
    data section's, and its own token cache (data.token_cache/<name> when a path is named; "auto" keys it)."""
    quality = {m: dict(q) for m, q in cfg.quality.items()}
    for m, q in src.quality.items():
        quality[m] = {**quality.get(m, {}), **q}
    limits = type(cfg.limits)(**{**cfg.limits.model_dump(), **src.limits})
    cache = cfg.token_cache if cfg.token_cache == "auto" else f"{cfg.token_cache.rstrip('/')}/{name}"
    return cfg.model_copy(
        update={
            "train_shards": list(src.shards),
            "quality": quality,
            "limits": limits,
            "token_cache": cache,
            "sources": {},
            "format": src.format or cfg.format,
            "format_options": {**cfg.format_options, **src.format_options},
        }
    )


def open_sources(cfg: DataConfig, vocab_fingerprint: str, seed: int) -> list[Source]:
    """Every source's shards listed and its token cache claimed, before anything is read: no shards, or a
    cache made under other settings, is a UserError here."""
    out = []
    for name, src in cfg.source_items():
        dcfg = source_data(cfg, name, src) if cfg.sources else cfg
        reader(dcfg.format, dcfg.format_options)  # an unknown format, or its library missing, before anything is read
        listed: dict[str, list] = {}  # the shards' sizes and dates, from the listing: no request per shard
        shards = list_shards(dcfg.train_shards, listed)
        cache = open_cache(dcfg, vocab_fingerprint, seed, shards, listed)
        out.append(Source(name, src, dcfg, shards, cache, bool(cfg.sources)))
    return out


def fill_caches(sources: list[Source], modalities: dict[str, dict], seed: int) -> None:
    """Tokenize what each source's cache lacks (on the connected Ray), then read its completion records.

    ErrorRateExceeded carries the source's accounting so far as `.tally`; a source of which no record could
    be kept is a UserError naming it (when there are several)."""
    for s in sources:
        try:
            s.built = build_cache(s.data, modalities, seed, s.cache, shards=s.shards)
            s.done, _ = s.cache.status(s.shards)  # read once, for the accounting and the plan
            s.tally = require_data(s.cache, s.shards, s.done)
        except ErrorRateExceeded as e:
            e.tally = s.cache.tally(s.shards)
            raise
        except UserError as e:
            raise UserError(f"source {s.name!r}: {e}" if s.named else str(e)) from None
        b = s.built
        log.info(
            "token cache %s%s: %d shards reused, %d tokenized (%d records, %.1f s)",
            b["url"],
            f" (source {s.name})" if s.named else "",
            b["already_cached"],
            b["tokenized"],
            b["records"],
            b["seconds"],
        )


def plan_windows(plan: list[tuple[int, str]], docs: dict[str, int], size: int) -> list[list[list[int]]]:
    """Cut the plan's documents, in order, into windows of `size` documents (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"a packing window holds at least one document, not {size}")
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


def window_size(cfg: DataConfig, metas: dict[str, dict] | None = None) -> int:
    """Documents per packing window: data.mix.window with a token mixture, data.pack_window when set, else
    as many as fill data.pack_rows rows at the cached documents' mean length (so a packer holds about
    pack_rows × seq_len tokens, whatever the documents' size)."""
    if cfg.mix.on:
        return cfg.mix.window
    if cfg.pack_window or not metas:
        return cfg.pack_window or 128
    tokens = sum(shard_tokens(m) for m in metas.values())
    docs = sum(int(m["rows"]) for m in metas.values())
    return max(1, int(cfg.pack_rows * cfg.seq_len * docs / max(tokens, 1)))


def stream_settings(cfg: DataConfig, seed: int, mix_rows: int, cache_digest: str, window) -> dict:
    """What the row stream depends on beyond the cache; a resume under other settings is refused."""
    s = {
        "token_cache": cache_digest,
        "seed": seed,
        "seq_len": cfg.seq_len,
        "window": window,
        "modality_order": cfg.modality_order,
        "mix": cfg.mix.model_dump(mode="json"),
    }
    if cfg.mix.on:
        s["mix_rows"] = mix_rows
    if cfg.cfg_dropout:  # (only when set: a stream without it is the one every earlier checkpoint consumed)
        s["cfg_dropout"] = cfg.cfg_dropout
    return s


def shard_tokens(meta: dict) -> int:
    """Tokens of a cached shard's documents, from its completion record (`tokens`, exact; a record that gives
    only `ids` counts 4 markers a document: <bos>, <eos>, one part's begin/end)."""
    if "tokens" in meta:
        return int(meta["tokens"])
    return int(meta["ids"]) + 4 * int(meta["rows"])


def epochs_needed(src: SourceConfig, source_tokens: int, share: float, steps: int, step_tokens: int) -> int:
    """Epochs to plan for a source: `stop` its own `epochs`; `repeat` as many as `steps` steps of
    `step_tokens` tokens can take from it at its largest share (sources.largest_share), plus one: a `repeat`
    source never runs out before train.steps."""
    if src.exhausted == "stop":
        return src.epochs
    return max(1, math.ceil(steps * step_tokens * share / max(source_tokens, 1)) + 1)


def plan_sources(
    names: list[str],
    sources: list[SourceConfig],
    shards: list[list[str]],
    metas: list[dict],
    seed: int,
    window: int | list[int],
    steps: int,
    step_tokens: int,
):
    """Every source's epochs of seeded shard order cut into packing windows, and the order to read them in.
    Returns (plans, windows, items): per source its (epoch, shard) plan and its windows (plan_windows), and
    the window items for the stream ({src, window, ranges}) in reading order."""
    plans, windows, per_window = [], [], []
    for i, (name, src, sh, meta) in enumerate(zip(names, sources, shards, metas)):
        tokens = {s: shard_tokens(meta[s]) for s in sh}
        docs = {s: int(meta[s]["rows"]) for s in sh}
        epochs = epochs_needed(src, sum(tokens.values()), largest_share(i, sources), steps, step_tokens)
        plan = shard_order(sh, seed, epochs, source=name)
        win = plan_windows(plan, docs, window[i] if isinstance(window, list) else window)
        per_doc = {s: tokens[s] / max(docs[s], 1) for s in sh}
        plans.append(plan)
        windows.append(win)
        per_window.append([sum((b - a) * per_doc[plan[pi][1]] for pi, a, b in w) for w in win])
    order = submission_order(windows, per_window, sources, step_tokens)
    items = [{"src": s, "window": j, "ranges": json.dumps(windows[s][j])} for s, j in order]
    return plans, windows, items


def plan_stream(
    cfg: DataConfig, sources: list[Source], seed: int, steps: int, rows_per_step: int, micro_batch_size: int
) -> StreamPlan:
    """The row stream over filled caches (fill_caches). `rows_per_step`: the global batch in rows that named
    sources' schedules count steps in (a resume keeps the figure its run started with)."""
    tally = Tally()
    for s in sources:
        tally.add(s.tally)
    per_source = {s.name: s.tally for s in sources}
    if not cfg.sources:
        (one,) = sources
        plan = shard_order(one.shards, seed, cfg.epochs)
        window = window_size(cfg, one.done)
        windows = plan_windows(plan, {s: m["rows"] for s, m in one.done.items()}, window)
        settings = stream_settings(cfg, seed, micro_batch_size, key_digest(one.cache.key), window)
        return StreamPlan(settings, tally, per_source, one.cache.url, plan, windows)
    configs = [s.config for s in sources]
    sizes = [window_size(cfg, s.done) for s in sources]
    plans, windows, items = plan_sources(
        [s.name for s in sources],
        configs,
        [s.shards for s in sources],
        [s.done for s in sources],
        seed,
        sizes,
        steps,
        rows_per_step * cfg.seq_len,
    )
    settings = stream_settings(cfg, seed, micro_batch_size, "", sizes)
    settings.pop("token_cache")
    settings.update(
        rows_per_step=rows_per_step,
        sources={
            s.name: {
                "token_cache": key_digest(s.cache.key),
                **s.config.model_dump(mode="json", include={"weight", "exhausted", "epochs"}),
            }
            for s in sources
        },
    )
    mixed = Interleaving(
        [s.name for s in sources],
        [(s.cache.url, p) for s, p in zip(sources, plans)],
        [c.model_dump(mode="json") for c in configs],
        [len(w) for w in windows],
        items,
        rows_per_step,
    )
    log.info(
        "%d sources: %s",
        len(sources),
        ", ".join(
            f"{s.name} ({len(s.shards)} shards, {len(w)} windows over {p[-1][0] + 1 if p else 0} epochs)"
            for s, w, p in zip(sources, windows, plans)
        ),
    )
    return StreamPlan(settings, tally, per_source, mixed=mixed)
