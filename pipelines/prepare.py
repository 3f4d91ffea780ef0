"""`omnistream data prepare`: any source (Parquet, JSONL, folders, tar) -> WebDataset shards, on Ray.

    OUT_DIR/shard-<input>-<part>.tar   the records of input shard <input> (in the listed order), cut every
                                       --shard-size records (or bytes: `256MB`)
    OUT_DIR/.prepare/<input>.json      written last: that input is finished (its outputs, their sizes and
                                       sha256, its accounting); a prepare run again skips it
    OUT_DIR/prepare.json               the report: every record read, written or errored with its reason

Each input shard is one Ray task (read with its format's reader, the same bounds as training), so inputs
prepare in parallel and a prepare stopped half-way redoes only the inputs without a finished record (their
half-written outputs are removed first). Output bytes depend on the records alone: members are written in
a fixed order with a fixed date, owner and mode (webdataset's TarWriter, mtime 0), so the same input gives
byte-identical shards however often, and on however many workers, it is prepared.

What is checked here is what reading checks (sizes, paths, keys); decoding, quality filters and dedup run
when the shards are trained on or inspected (`data inspect`), as for any tar shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

from omnistream.common import logs
from omnistream.common.errors import UserError

from .accounting import Tally
from .formats import ReadBounds, reader
from .records import part_ext

log = logging.getLogger(__name__)
DONE = ".prepare"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b)", re.I)
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def shard_size(text: str) -> tuple[str, int]:
    """--shard-size: ("records", n) for a number, ("bytes", n) for `256MB` / `1GiB`."""
    t = str(text).strip()
    if t.isdigit() and int(t) > 0:
        return "records", int(t)
    m = _SIZE.fullmatch(t)
    if m and float(m.group(1)) > 0:
        return "bytes", int(float(m.group(1)) * _UNITS[m.group(2)[0].lower()])
    raise UserError(f"--shard-size {text!r}: give a number of records (1000) or a size (256MB)")


def guess_format(shard: str) -> str:
    """The format a shard's name says: .parquet, .jsonl, a folder, else tar."""
    s = shard.lower().rstrip("/")
    if s.endswith((".parquet", ".pq", ".arrow")):
        return "parquet"
    if s.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if "://" not in shard and os.path.isdir(shard):
        return "folder"
    return "webdataset"


def _member_order(field: str) -> tuple:
    i, ext = part_ext(field)
    return (i if i is not None else -1, ext)


def _key(key: str) -> str:
    """A key as a tar member's stem: WebDataset splits at the basename's first dot, so a dot there is `_`."""
    head, _, base = key.rpartition("/")
    return (head + "/" if head else "") + base.replace(".", "_")


def prepare_one(i: int, shard: str, fmt: str, options: dict, bounds: ReadBounds, out: str, size: tuple) -> dict:
    """Prepare input shard number `i`: its records to OUT/shard-<i>-<j>.tar, then its finished record."""
    import webdataset as wds

    out_dir = Path(out)
    for old in out_dir.glob(f"shard-{i:05d}-*"):  # a prepare stopped here before: begin this input again
        old.unlink()
    tally = Tally()
    outputs: list[dict] = []
    w, held, n_out, keys = None, 0, 0, set()

    def close() -> None:
        nonlocal w
        if w is not None:
            w.close()
            tmp = out_dir / f".tmp-shard-{i:05d}-{len(outputs):04d}.tar"
            final = out_dir / f"shard-{i:05d}-{len(outputs):04d}.tar"
            os.replace(tmp, final)
            data = final.read_bytes()
            outputs.append({"name": final.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            w = None

    t0 = time.perf_counter()
    for r in reader(fmt, options).read(shard, bounds):
        if not r.key:  # the shard as a whole
            tally.shard_error(shard, r.error or "shard_unreadable", r.detail)
            continue
        tally.seen += 1
        key = _key(r.key)
        if not r.error and key in keys:
            r.error, r.detail = "duplicate_key", f"{r.key} written as {key} twice"
        if r.error:
            tally.errored[r.error] += 1
            tally.per_shard.setdefault(shard, Counter()).update(["seen", "errored"])
            tally._letter(
                {
                    "shard": shard,
                    "key": r.key,
                    "field": "",
                    "status": "errored",
                    "reason": r.error,
                    "detail": r.detail[:300],
                }
            )
            continue
        keys.add(key)
        nbytes = sum(len(v) for v in r.fields.values())
        if w is not None and (n_out >= size[1] if size[0] == "records" else held + nbytes > size[1]):
            close()
        if w is None:
            tmp = out_dir / f".tmp-shard-{i:05d}-{len(outputs):04d}.tar"
            w, held, n_out = wds.TarWriter(str(tmp), mtime=0, user="omnistream", group="omnistream"), 0, 0
        # fields in one fixed order (TarWriter sorts names; a document's parts stay numbered), bytes as read
        w.write({"__key__": key, **{f: r.fields[f] for f in sorted(r.fields, key=_member_order)}})
        tally.kept += 1
        tally.per_shard.setdefault(shard, Counter()).update(["seen", "kept"])
        held, n_out = held + nbytes, n_out + 1
    close()
    done = {
        "input": shard,
        "outputs": outputs,
        "records": tally.kept,
        "tally": tally.to_json(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / DONE).mkdir(exist_ok=True)
    tmp = out_dir / DONE / f"{i:05d}.json.tmp"
    tmp.write_text(json.dumps(done))
    os.replace(tmp, out_dir / DONE / f"{i:05d}.json")
    return done


def finished(out: Path, i: int, shard: str) -> dict | None:
    """Input `i`'s finished record when it is for this shard and its outputs are there, whole."""
    p = out / DONE / f"{i:05d}.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if d.get("input") != shard:
        return None
    for o in d["outputs"]:
        f = out / o["name"]
        if not f.exists() or f.stat().st_size != o["bytes"]:
            return None
    return d


def _run(todo: list[int], shards, fmt, options, bounds, out: str, size, workers: int):
    """(input number, its finished record) as each is done: Ray tasks, `workers` at once; 0: in this process."""
    if workers == 0:
        for i in todo:
            yield i, prepare_one(i, shards[i], fmt, options, bounds, out, size)
        return
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(prepare_one)
    pending: dict = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < workers:
            i = queue.pop(0)
            pending[task.remote(i, shards[i], fmt, options, bounds, out, size)] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)


def prepare(
    shards: list[str], fmt: str, options: dict, bounds: ReadBounds, out: str, size: tuple, workers: int
) -> dict:
    """Every input shard prepared (those finished before skipped); returns the report written to prepare.json.
    `workers` inputs at once as Ray tasks on the connected cluster; 0: one after another in this process (no
    Ray: small data, or a machine without it)."""
    from tqdm import tqdm

    out_dir = Path(out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = json.dumps(shards)
    plan_file = out_dir / DONE / "inputs.json"
    if plan_file.exists() and plan_file.read_text() != listed:
        raise UserError(
            f"{out_dir} holds a prepare of other inputs ({DONE}/inputs.json): choose another OUT_DIR, or empty it"
        )
    (out_dir / DONE).mkdir(exist_ok=True)
    plan_file.write_text(listed)
    reader(fmt, options)  # an unknown format or option: one line, before any task starts
    results: dict[int, dict] = {}
    for i, s in enumerate(shards):
        d = finished(out_dir, i, s)
        if d is not None:
            results[i] = d
    todo = [i for i in range(len(shards)) if i not in results]
    t0, records, errors = time.perf_counter(), 0, 0
    with tqdm(
        total=len(shards), initial=len(results), desc=f"{logs.TAG} preparing", unit=" shard", disable=None
    ) as bar:
        for i, d in _run(todo, shards, fmt, options, bounds, str(out_dir), size, workers):
            results[i] = d
            t = Tally.from_json(d["tally"])
            records += t.seen
            errors += t.seen - t.kept + len(t.shard_errors)
            bar.set_postfix_str(
                f"{records / max(time.perf_counter() - t0, 1e-9):.0f} records/s, {errors} errors", refresh=False
            )
            bar.update(1)
    tally = Tally()
    for i in sorted(results):
        tally.add(Tally.from_json(results[i]["tally"]))
    report = {
        "inputs": len(shards),
        "prepared_now": len(todo),
        "shards": [o["name"] for i in sorted(results) for o in results[i]["outputs"]],
        "written": tally.kept,
        **{k: v for k, v in tally.report().items() if k in ("seen", "errored", "shard_errors", "dead_letter")},
    }
    (out_dir / "prepare.json").write_text(json.dumps(report, indent=1))
    return report
