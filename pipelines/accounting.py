"""Data accounting: every record read is counted once as kept, filtered or errored.

A `DataLedger` Ray actor collects counts and dead letters from the pipeline's
tokenizer actors (one message per batch, fire-and-forget). Readers on the
driver or in the trainer ask it for a snapshot.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import ray

MAX_DEAD_LETTERS = 10_000  # beyond this, dead letters are counted but not listed


@dataclass
class Tally:
    seen: int = 0
    kept: int = 0
    filtered: Counter = field(default_factory=Counter)
    errored: Counter = field(default_factory=Counter)
    per_modality: Counter = field(default_factory=Counter)   # kept records carrying each modality
    dead_letter: list = field(default_factory=list)           # {shard, key, field, reason, detail}
    dead_letter_dropped: int = 0

    def add(self, other: "Tally") -> None:
        self.seen += other.seen
        self.kept += other.kept
        self.filtered.update(other.filtered)
        self.errored.update(other.errored)
        self.per_modality.update(other.per_modality)
        room = MAX_DEAD_LETTERS - len(self.dead_letter)
        self.dead_letter += other.dead_letter[:max(room, 0)]
        self.dead_letter_dropped += other.dead_letter_dropped + max(len(other.dead_letter) - max(room, 0), 0)

    def balanced(self) -> bool:
        return self.seen == self.kept + sum(self.filtered.values()) + sum(self.errored.values())

    def metrics(self) -> dict[str, float]:
        m = {"data/seen": self.seen, "data/kept": self.kept}
        m.update({f"data/filtered/{k}": v for k, v in self.filtered.items()})
        m.update({f"data/errored/{k}": v for k, v in self.errored.items()})
        return m

    def report(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "filtered": dict(self.filtered),
                "errored": dict(self.errored), "per_modality": dict(self.per_modality),
                "balanced": self.balanced(), "dead_letter": self.dead_letter,
                "dead_letter_not_listed": self.dead_letter_dropped}


@ray.remote(num_cpus=0)
class DataLedger:
    def __init__(self):
        self.tally = Tally()

    def add(self, t: Tally) -> None:
        self.tally.add(t)

    def snapshot(self) -> Tally:
        return self.tally
