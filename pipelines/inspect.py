"""`omnistream data inspect`: the read, decode, filter and dedup stages without training.

Runs the same RecordProcessor actors as the training stream (on Ray, spread over
`data.tokenizer_actors` actors) over one pass of the shards and returns the data report:
totals, per-reason, per-modality and per-shard counts, shard-level failures, dead letters,
and, when a tokenizer bundle is given, the tokens each modality would contribute.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import ray

from omnistream.common import logs

from .accounting import Tally, error_rate_verdict
from .config import DataConfig
from .ledger import DataLedger
from .shards import list_shards
from .stream import lost_shard, record_stream, shards_may_die


def inspect_shards(
    specs: list[str], cfg: DataConfig, modalities: dict[str, dict], seed: int, bundle_dir: str | None = None
) -> dict:
    shards = list_shards(specs)
    ledger = DataLedger.remote(cfg.max_error_rate, cfg.error_rate_window)
    ds = shards_may_die(record_stream(cfg, modalities, seed, [(0, s) for s in shards], bundle_dir, ledger))
    tokens: Counter = Counter()
    names = list(modalities)
    from tqdm import tqdm

    with tqdm(total=len(shards), desc=f"{logs.TAG} inspecting shards", unit=" shard", disable=None) as bar:
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            for m in batch["mods"]:
                idx, n = np.unique(np.asarray(m), return_counts=True)
                for i, c in zip(idx, n):
                    tokens["special" if i == 0 else names[i - 1]] += int(c)
            bar.update(len(ray.get(ledger.parts_seen.remote())) - bar.n)  # shards whose tally is in
        bar.update(len(ray.get(ledger.parts_seen.remote())) - bar.n)
    reported = set(ray.get(ledger.parts_seen.remote()))
    for s in shards:
        if f"0:{s}" not in reported:
            lost = Tally()
            lost_shard(s, lost)
            ledger.add.remote(lost, f"0:{s}")
    tally = ray.get(ledger.snapshot.remote())
    report = tally.report()
    report["shards"] = len(shards)
    if bundle_dir:
        report["tokens"] = dict(tokens)
    report["error_rate_verdict"] = error_rate_verdict(tally, cfg.max_error_rate, cfg.error_rate_window, final=True)
    if not tally.balanced():  # the pipeline checks its own books at the end of a pass
        raise AssertionError(
            f"data accounting does not balance: {report['seen']} seen, {report['kept']} kept, "
            f"{report['filtered']} filtered, {report['errored']} errored"
        )
    return report


def format_report(r: dict) -> str:
    lines = [
        f"{r['shards']} shards, {r['seen']} records: {r['kept']} kept, "
        f"{sum(r['filtered'].values())} filtered, {sum(r['errored'].values())} errored"
    ]
    for title, key in (("filtered", "filtered"), ("errored", "errored")):
        for reason, n in sorted(r[key].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {title:8s} {reason:28s} {n}")
    if r["per_modality"]:
        lines.append("per modality (records carrying it):")
        for name, c in r["per_modality"].items():
            lines.append(
                f"  {name:10s} seen {c.get('seen', 0):6d}  kept {c.get('kept', 0):6d}  "
                f"filtered {c.get('filtered', 0):5d}  errored {c.get('errored', 0):5d}"
            )
    parts = r.get("parts") or {}
    if parts.get("per_document"):
        hist = parts["per_document"]
        lines.append("parts per document: " + ", ".join(f"{k}: {v}" for k, v in hist.items()))
        lines.append(
            "parts per modality: "
            + ", ".join(f"{k} kept {v['kept']} dropped {v['dropped']}" for k, v in parts["per_modality"].items())
        )
    if parts.get("dropped"):
        lines.append(
            "parts dropped (data.drop_bad_parts): " + ", ".join(f"{k} {v}" for k, v in parts["dropped"].items())
        )
    if r.get("documents_split"):
        lines.append(f"documents longer than a row (split where a part begins): {r['documents_split']}")
    if r.get("tokens"):
        lines.append("tokens: " + ", ".join(f"{k} {v}" for k, v in r["tokens"].items()))
    bad_shards = {s: c for s, c in r["per_shard"].items() if c.get("errored") or c.get("shard_errors")}
    if bad_shards:
        lines.append("shards with errors:")
        for s, c in bad_shards.items():
            lines.append(f"  {s}: {c.get('errored', 0)} errored records, {c.get('shard_errors', 0)} shard failures")
    for e in r["shard_errors"]:
        lines.append(f"  shard failure {e['shard']}: {e['reason']} ({e['detail'][:80]})")
    if r.get("unconsumed"):
        lines.append(
            "members no modality reads (passed over, their records kept): "
            + ", ".join(f".{k} {v}" for k, v in sorted(r["unconsumed"].items(), key=lambda kv: -kv[1]))
        )
    if r.get("error_rate_verdict"):
        lines.append("warning: " + r["error_rate_verdict"])
    lines.append(f"dead letters: {len(r['dead_letter'])} listed (--json shows them)")
    return "\n".join(lines)
