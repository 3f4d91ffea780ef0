"""`omnistream data info`: what a source holds, in numbers and pictures, before a cluster is spent on it.

Records are read, decoded, filtered and (with a fitted bundle) encoded exactly as training does them
(RecordProcessor, in this process, no dedup), up to `limit` records in the shards' listed order. Of each:

    tokens per document and per part of each modality   (with a bundle: what a row will hold)
    image width x height in pixels, clip seconds        (from the file headers: Pillow, soundfile)
    text characters, parts per document                 (every record, kept or not)
    the outcome: kept / filtered / errored with reasons (as `data inspect` counts them)

`table(stats)` prints them (n, min, median, p90, max, mean); `figure(stats)` draws each as a histogram
(matplotlib) for the tracker, where people would rather look than read.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator

import numpy as np

from .accounting import Tally
from .config import DataConfig
from .documents import document_length
from .records import RawRecord, part_ext
from .shards import list_shards


def records(
    specs: list[str], cfg: DataConfig, modalities: dict[str, dict], seed: int, bundle: str | None, limit: int
) -> Iterator[tuple[RawRecord, object]]:
    """(record, Outcome) of the first `limit` records of the shards, as training would treat them."""
    from .documents import RecordProcessor

    proc = RecordProcessor(modalities, bundle, cfg, seed)
    tally, n = Tally(), 0
    for _, r, o in proc.process([(0, s) for s in list_shards(specs)], tally):
        yield r, o
        n += 1
        if n >= limit:
            return


def media_measures(r: RawRecord) -> dict[str, list[float]]:
    """Sizes read from the fields' headers: image pixels (w, h), clip seconds, text characters."""
    from PIL import Image

    out: dict[str, list[float]] = {}
    for f, data in r.fields.items():
        ext = part_ext(f)[1]
        try:
            if ext in ("jpg", "jpeg", "png", "webp"):
                with Image.open(io.BytesIO(data)) as im:  # the header only: no pixels are decoded
                    w, h = im.size
                out.setdefault("image width (px)", []).append(w)
                out.setdefault("image height (px)", []).append(h)
            elif ext in ("wav", "flac"):
                import soundfile as sf

                out.setdefault("clip length (s)", []).append(sf.info(io.BytesIO(data)).duration)
            elif ext in ("txt", "text"):
                out.setdefault("text length (chars)", []).append(len(data.decode("utf-8", "replace")))
        except Exception:  # noqa: BLE001 - an unreadable header is the record's outcome, counted there
            continue
    return out


def collect(items) -> dict:
    """Every measure of (record, Outcome) pairs: {"values": {name: [...]}, "outcomes": Counter}."""
    values: dict[str, list[float]] = {}
    outcomes: Counter = Counter()
    for r, o in items:
        outcomes[o.status if o.status == "kept" else f"{o.status}/{o.reason}"] += 1
        for k, v in media_measures(r).items():
            values.setdefault(k, []).extend(v)
        if o.status != "kept":
            continue
        if o.part_mods:
            values.setdefault("parts per document", []).append(len(o.part_mods))
        if o.parts:
            values.setdefault("tokens per document", []).append(document_length(o.parts))
            for m, ids in o.parts:
                values.setdefault(f"tokens per {m} part", []).append(len(ids))
    return {"values": values, "outcomes": outcomes}


def summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "n": int(a.size),
        "min": float(a.min()),
        "p50": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def report(stats: dict) -> dict:
    """The JSON of `data info --json`: each measure's summary and the outcomes."""
    return {
        "records": sum(stats["outcomes"].values()),
        "outcomes": dict(stats["outcomes"].most_common()),
        "measures": {k: summary(v) for k, v in sorted(stats["values"].items()) if v},
    }


def table(rep: dict) -> str:
    lines = [f"{rep['records']} records: " + ", ".join(f"{k} {v}" for k, v in rep["outcomes"].items())]
    if rep["measures"]:
        lines.append(f"  {'measure':24s} {'n':>7s} {'min':>9s} {'median':>9s} {'p90':>9s} {'max':>9s} {'mean':>9s}")
    for k, s in rep["measures"].items():
        lines.append(
            f"  {k:24s} {s['n']:7d} {s['min']:9.4g} {s['p50']:9.4g} {s['p90']:9.4g} {s['max']:9.4g} {s['mean']:9.4g}"
        )
    return "\n".join(lines)


def figure(stats: dict, title: str = "") -> bytes:
    """Each measure as a histogram, one panel each, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    names = [k for k, v in sorted(stats["values"].items()) if v]
    cols = 3
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        v = np.asarray(stats["values"][name], dtype=np.float64)
        ax.hist(v, bins=min(40, max(5, len(np.unique(v)))), color="#3a6ea5")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
