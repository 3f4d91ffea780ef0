"""Named data sources, mixed by weight on a step schedule, into one row stream that resumes exactly.

    [data.sources.captions]
    shards = ["s3://corpus/captions-{000..099}.tar"]
    weight = [[0, 0.8], [2000, 0.5]]     # a number, or [step, weight] points (piecewise constant)
    exhausted = "repeat"                  # or "stop" (after `epochs` passes)

Each source is tokenized into a token cache of its own (its own quality filters and limits, its own
accounting: data/source/<name>/...), planned as its own seeded shard order, epoch after epoch, and cut
into packing windows that are packed as every stream's windows are (rows.WindowRows). Then one actor,
`Interleave`, deals the rows out in stream order:

    at each unit (one row; one mixer batch of micro_batch_size rows when data.mix is set, so that each
    micro-batch keeps its modality shares), the source whose consumed tokens lag furthest behind its
    share is next: every source s holds a target T_s and an actual A_s, in non-pad tokens; a unit of n
    tokens from source c adds w_s(step) * n to every T_s and n to A_c, where w(step) is the schedule's
    weights at the unit's step normalised over the sources still running. |T_s - A_s| stays within
    about one unit's tokens, so the share of every source over any stretch of the stream is its
    scheduled weight to within one row per source (a stretch of 50 steps of 16 rows: 1/800).

Weights are piecewise constant: a source's weight at step s is the one of its last point at or before
s (a ramp is a few points). The step of a row is its place in the stream divided by the run's global
batch in rows as it started (workers x micro_batch_size x grad_accum); a resume on another number of
workers keeps that global batch where it can (cluster/driver.resume_plan), and the schedule is counted
in the original steps either way, so the stream is the same.

When a source runs out: `repeat` starts its next epoch (a new seeded shard order; the planner (plan.py) plans
as many epochs as train.steps can use at the source's largest share, counted as if every `stop` source had
left, so it never runs out first); `stop` takes it out of the mix
after its `epochs` passes, and the others share its weight. When no source with a positive weight is
left, the stream ends.

The data position (what a checkpoint keeps) is the last consumed row's interleaving state: every
source's T and A, and the window, row and row hash of the last row taken from each source. A resume
restarts every source at its own window (re-reading at most one window per source), checks the row
hashes, and deals the rest out as the uninterrupted run would have: the same rows in the same places.
"""

from __future__ import annotations

import json
import math
from collections import deque
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from omnistream.common.stream import row_hash


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(
        description="this source's shards (tar files, Parquet or JSONL files, folders, by its format): "
        "paths, globs, {000..099} braces or URLs (s3:// with the s3 extra)"
    )
    format: str = Field("", description="how this source's shards are stored (pipelines/formats.py); '' = data.format")
    format_options: dict[str, Any] = Field(
        default_factory=dict, description="this source's format options, over data.format_options"
    )
    weight: float | list[tuple[int, float]] = Field(
        1.0,
        description="share of the consumed tokens: a number, or [[step, weight], ...] points, piecewise constant "
        "from each point's step on (the first point at step 0); normalised over the sources at each step",
    )
    exhausted: Literal["repeat", "stop"] = Field(
        "repeat",
        description="when the source runs out: `repeat` starts its next epoch (a new seeded shard order); "
        "`stop` takes it out of the mix after `epochs` passes, the others sharing its weight",
    )
    epochs: int = Field(1, ge=1, description='passes over this source before it stops (exhausted = "stop")')
    quality: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-modality quality filters for this source, over data.quality's"
    )
    limits: dict[str, Any] = Field(
        default_factory=dict, description="per-record bounds for this source, over data.limits'"
    )

    @field_validator("weight")
    @classmethod
    def _weight(cls, v):
        if isinstance(v, (int, float)):
            if v < 0 or not math.isfinite(v):
                raise ValueError(f"a source's weight is a number >= 0, not {v}")
            return float(v)
        if not v:
            raise ValueError("a weight schedule needs at least one [step, weight] point")
        steps = [s for s, _ in v]
        if steps[0] != 0:
            raise ValueError(f"a weight schedule starts at step 0 (its first point is at step {steps[0]})")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"a weight schedule's steps must increase: {steps}")
        bad = [w for _, w in v if w < 0 or not math.isfinite(w)]
        if bad:
            raise ValueError(f"weights are numbers >= 0, not {bad}")
        return [(int(s), float(w)) for s, w in v]

    def weight_at(self, step: int) -> float:
        if isinstance(self.weight, float):
            return self.weight
        w = self.weight[0][1]
        for s, v in self.weight:
            if s > step:
                break
            w = v
        return w

    def max_weight(self) -> float:
        return self.weight if isinstance(self.weight, float) else max(w for _, w in self.weight)

    def change_steps(self) -> list[int]:
        return [] if isinstance(self.weight, float) else [s for s, _ in self.weight]


def weights_at(sources: list[SourceConfig], step: int) -> np.ndarray:
    return np.array([s.weight_at(step) for s in sources], dtype=np.float64)


def largest_share(s: int, sources: list[SourceConfig]) -> float:
    """The largest share of the stream source `s` can have at any step: its weight over the weights of the
    sources that never leave (`repeat`) at that step. A `stop` source leaves when it runs out and the others
    share its weight, so the share over all sources' weights is not a bound (A repeat 0.5, B stop 0.5: A
    takes every row once B has left, twice what half of them would plan for)."""
    steps = sorted({0, *[c for src in sources for c in src.change_steps()]})
    share = 0.0
    for t in steps:
        w = sources[s].weight_at(t)
        if w > 0:
            staying = sum(src.weight_at(t) for i, src in enumerate(sources) if src.exhausted == "repeat" or i == s)
            share = max(share, min(1.0, w / staying))
    return share


def submission_order(
    windows: list[list], tokens_per_window: list[list[float]], sources: list[SourceConfig], step_tokens: float
) -> list[tuple[int, int]]:
    """(source, window index in the source) for every window, in the order the stream will need them: each
    window at the step where the schedule will have taken its source's tokens up to the window's start. The
    order only decides what is read first (the interleaving does not depend on it), so an estimate is enough."""
    order = []
    total = float(sum(s.max_weight() for s in sources)) or 1.0
    for si, src in enumerate(sources):
        changes = src.change_steps() or [0]
        at = np.concatenate([[0.0], np.cumsum(tokens_per_window[si])[:-1]]) if tokens_per_window[si] else []
        # steps needed to take `x` tokens from this source at its scheduled (un-normalised) rate; a source
        # at weight 0 for a while is read after those steps
        for j, x in enumerate(at):
            step, taken = 0.0, 0.0
            bounds = changes[1:] + [math.inf]
            for a, b in zip(changes, bounds):
                rate = src.weight_at(a) / total * step_tokens
                span = (b - a) * rate
                if rate > 0 and taken + span >= x:
                    step = a + (x - taken) / rate
                    break
                taken += span
                step = b
            order.append((step, si, j))
    order.sort()
    return [(si, j) for _, si, j in order]


class Interleave:
    """Ray Data actor (one, in order): windows of packed rows from every source -> the one row stream,
    numbered (`pos`), each row with its source (`src`) and the interleaving state after it (`state`, JSON:
    what a checkpoint resumes from). Rows are held until the rule can decide with them.

    A window is named by its source and its index in that source (`src`, `win`): the stream's content does
    not depend on the order windows are read in, nor on how many epochs were planned past the point reached.
    Each source's windows arrive in their order (one block each; an empty window as one marker row, row -1,
    dropped here), so all of a source has arrived once a block of its last window has, and a source with no
    rows held then is exhausted."""

    def __init__(
        self, sources: list[dict], windows: list[int], rows_per_step: int, unit: int, start: dict | None = None
    ):
        self.sources = [SourceConfig(**s) for s in sources]
        self.S = len(self.sources)
        self.windows = list(windows)  # windows planned per source
        self.seen = [-1] * self.S  # the highest window of each source arrived
        self.G, self.unit = rows_per_step, unit
        self.buf: list[deque] = [deque() for _ in range(self.S)]
        start = start or {}
        self.pos = int(start.get("position", 0))
        self.T = np.array(start.get("T", [0.0] * self.S), dtype=np.float64)
        self.A = np.array(start.get("A", [0.0] * self.S), dtype=np.float64)
        self.last = list(start.get("last", [None] * self.S))  # [window, row, row hash, epoch] per source

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(batch["keys"]):
            s, k = int(batch["src"][0]), int(batch["win"][0])
            self.seen[s] = max(self.seen[s], k)
            keep = batch["row"] >= 0  # the marker of an empty window carries row -1
            if keep.any():
                batch = {c: v[keep] for c, v in batch.items()}
                for a in range(0, len(batch["keys"]), self.unit):
                    self.buf[s].append({c: v[a : a + self.unit] for c, v in batch.items()})
        return self.deal()

    def deal(self) -> dict[str, np.ndarray]:
        """Every unit the rule can decide with the rows held."""
        out, states = [], []
        while True:
            w = weights_at(self.sources, self.pos // self.G)
            live = [s for s in range(self.S) if w[s] > 0 and not self.exhausted(s)]
            if not live:
                break
            wn = np.zeros(self.S)
            wn[live] = w[live] / w[live].sum()
            c = max(live, key=lambda s: (self.T[s] - self.A[s], -s))  # furthest behind; ties to the first
            if not self.buf[c]:
                break  # its next rows are still to come: wait for them
            u = self.buf[c].popleft()
            for r in range(len(u["keys"])):
                tok = float((u["doc_ids"][r] > 0).sum())
                self.T += wn * tok
                self.A[c] += tok
                keys = str(u["keys"][r])
                self.last[c] = [int(u["win"][r]), int(u["row"][r]), row_hash(keys), int(keys.split(":", 1)[0])]
                states.append(json.dumps({"T": self.T.tolist(), "A": self.A.tolist(), "last": self.last}))
                self.pos += 1
            out.append(u)
        if not out:
            # no columns at all: Ray Data skips an empty block, where 0-row tensor columns fail Arrow's
            # conversion and come back as pickled objects
            return {}
        rows = {c: np.concatenate([u[c] for u in out]) for c in out[0]}
        n = len(rows["keys"])
        rows["pos"] = np.arange(self.pos - n, self.pos, dtype=np.int64)
        rows["state"] = np.array(states, dtype=object)
        return rows

    def exhausted(self, s: int) -> bool:
        return not self.buf[s] and self.seen[s] >= self.windows[s] - 1


def resume_items(items: list[dict], state: dict | None) -> tuple[list[dict], dict]:
    """The window items a stream resumed at `state` reads (each source from the window of its last consumed
    row on), and the rows to skip in those windows ({"src:window": [row, row hash]})."""
    if not state:
        return items, {}
    first, skip = {}, {}
    for s, last in enumerate(state["last"]):
        if last is not None:
            first[s] = int(last[0])
            skip[f"{s}:{int(last[0])}"] = [int(last[1]), last[2]]
    return [it for it in items if it["window"] >= first.get(it["src"], 0)], skip
