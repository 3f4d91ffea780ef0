"""The `DataLedger` Ray actor: collects counts and dead letters from the pipeline's tokenizer actors
(one message per batch, fire-and-forget). Readers on the driver or in the trainer ask it for a snapshot.
"""

from __future__ import annotations

import ray

from .accounting import Tally, error_rate_verdict


@ray.remote(num_cpus=0)
class DataLedger:
    """Collects the pipeline actors' tallies; judges the error rate on the first window of records.

    Each tally comes with the part of the stream it covers (an epoch's shard, a mixing window).
    When Ray Train restarts the worker group after a failure the stream is read again from the
    start; a part seen again REPLACES its earlier count, so a record is never counted twice.
    """

    def __init__(self, max_rate: float = 1.0, window: int = 1000):
        self.tally = Tally()
        self.parts: dict[str, Tally] = {}
        self.max_rate, self.window = max_rate, window
        self.verdict: str | None = None
        self.judged = False
        self.extra: dict[str, float] = {}

    def add(self, t: Tally, part: str | None = None) -> None:
        if part is not None and part in self.parts:
            self.parts[part] = t
            self.tally = Tally()
            for p in self.parts.values():
                self.tally.add(p)
            return
        if part is not None:
            self.parts[part] = t
        self.tally.add(t)
        if not self.judged and self.tally.seen >= self.window:
            self.judged = True
            self.verdict = error_rate_verdict(self.tally, self.max_rate, self.window)

    def stop_reason(self, final: bool = False) -> str | None:
        if final and not self.judged:
            return error_rate_verdict(self.tally, self.max_rate, self.window, final=True)
        return self.verdict

    def snapshot(self) -> Tally:
        return self.tally

    def parts_seen(self) -> list[str]:
        return list(self.parts)

    def add_metrics(self, m: dict[str, float]) -> None:
        """Figures pipeline stages report (data/resume/*: one window re-read per source on a resume), summed,
        logged with the accounting."""
        for k, v in m.items():
            self.extra[k] = self.extra.get(k, 0) + v

    def metrics(self) -> dict[str, float]:
        return {**self.tally.metrics(), **self.extra}
