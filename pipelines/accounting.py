"""Data accounting: every record read is counted once as kept, filtered or errored.

Plain data and arithmetic, no Ray: the trainer imports it on machines without Ray. The `DataLedger`
Ray actor that gathers tallies from the pipeline's actors lives in ledger.py.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field


MAX_DEAD_LETTERS = 10_000  # beyond this, dead letters are counted but not listed


@dataclass
class Tally:
    seen: int = 0
    kept: int = 0
    filtered: Counter = field(default_factory=Counter)
    errored: Counter = field(default_factory=Counter)
    per_modality: dict = field(default_factory=dict)   # modality -> Counter(seen, kept, filtered, errored)
    per_shard: dict = field(default_factory=dict)      # shard -> Counter(seen, kept, filtered, errored)
    shard_errors: list = field(default_factory=list)   # {shard, reason, detail}: shards that failed as a whole
    dead_letter: list = field(default_factory=list)    # {shard, key, field, status, reason, detail}
    dead_letter_dropped: int = 0
    mix_dropped: int = 0                               # kept documents the token mixer left out (surplus)
    mix_dropped_tokens: Counter = field(default_factory=Counter)  # modality -> tokens in them

    def count(self, shard: str, key: str, o) -> None:
        """Account one record's Outcome (pipelines.stream) exactly once."""
        self.seen += 1
        if o.status == "kept":
            self.kept += 1
        else:
            (self.filtered if o.status == "filtered" else self.errored)[o.reason] += 1
            self._letter({"shard": shard, "key": key, "field": o.field, "status": o.status, "reason": o.reason,
                          "detail": o.detail})
        for name in o.modalities:
            self.per_modality.setdefault(name, Counter()).update(["seen", o.status])
        self.per_shard.setdefault(shard, Counter()).update(["seen", o.status])

    def shard_error(self, shard: str, reason: str, detail: str) -> None:
        self.shard_errors.append({"shard": shard, "reason": reason, "detail": detail[:300]})
        self.per_shard.setdefault(shard, Counter())["shard_errors"] += 1

    def _letter(self, d: dict) -> None:
        if len(self.dead_letter) < MAX_DEAD_LETTERS:
            self.dead_letter.append(d)
        else:
            self.dead_letter_dropped += 1

    def add(self, other: "Tally") -> None:
        self.seen += other.seen
        self.kept += other.kept
        self.filtered.update(other.filtered)
        self.errored.update(other.errored)
        for mine, theirs in ((self.per_modality, other.per_modality), (self.per_shard, other.per_shard)):
            for k, c in theirs.items():
                mine.setdefault(k, Counter()).update(c)
        self.shard_errors += other.shard_errors
        for d in other.dead_letter:
            self._letter(d)
        self.dead_letter_dropped += other.dead_letter_dropped
        self.mix_dropped += other.mix_dropped
        self.mix_dropped_tokens.update(other.mix_dropped_tokens)

    def balanced(self) -> bool:
        return self.seen == self.kept + sum(self.filtered.values()) + sum(self.errored.values())

    def metrics(self) -> dict[str, float]:
        m = {"data/seen": self.seen, "data/kept": self.kept}
        m.update({f"data/filtered/{k}": v for k, v in self.filtered.items()})
        m.update({f"data/errored/{k}": v for k, v in self.errored.items()})
        if self.mix_dropped:
            m["data/mix_dropped"] = self.mix_dropped
            m.update({f"data/mix_dropped_tokens/{k}": v for k, v in self.mix_dropped_tokens.items()})
        return m

    def report(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "filtered": dict(self.filtered),
                "errored": dict(self.errored), "balanced": self.balanced(),
                "per_modality": {k: dict(v) for k, v in sorted(self.per_modality.items())},
                "per_shard": {k: dict(v) for k, v in sorted(self.per_shard.items())},
                "shard_errors": self.shard_errors, "dead_letter": self.dead_letter,
                "dead_letter_not_listed": self.dead_letter_dropped,
                "mix_dropped": {"documents": self.mix_dropped, "tokens": dict(self.mix_dropped_tokens)}}


class ErrorRateExceeded(RuntimeError):
    """Too many of the first records were bad: the user probably pointed at the wrong data."""


def error_rate_verdict(t: Tally, max_rate: float, window: int, final: bool = False) -> str | None:
    """A one-line reason to stop, judged once `window` records were seen (or at the end of a short pass)."""
    if t.seen == 0 or (t.seen < window and not final):
        return None
    bad = sum(t.errored.values())
    if bad / t.seen > max_rate:
        top = ", ".join(f"{k} ({v})" for k, v in t.errored.most_common(3))
        return (f"{bad} of the first {t.seen} records could not be read ({top}), more than "
                f"data.max_error_rate={max_rate}: are the shards the data you meant?")
    return None


@dataclass
class Consumed:
    """What one training rank has consumed, in order: a hash chain over every record key of every row.

    Saved with each checkpoint (a few numbers, however long the run). On resume the rank re-reads
    `batches` micro-batches of the rebuilt stream and must arrive at the same chain, or the run
    stops: a resumed run neither repeats nor skips a record, and never silently does either.
    """
    batches: int = 0
    records: int = 0
    chain: str = "0" * 64

    def add(self, row_keys) -> None:
        """One micro-batch: each row's keys ("epoch:shard:key" per document, newline-separated)."""
        h = hashlib.sha256(self.chain.encode())
        for row in row_keys:
            for k in str(row).split("\n"):
                h.update(k.encode("utf-8", "surrogateescape") + b"\n")
                self.records += 1
        self.chain = h.hexdigest()
        self.batches += 1

    def to_json(self) -> dict:
        return {"batches": self.batches, "records": self.records, "chain": self.chain}

    @classmethod
    def from_json(cls, d: dict) -> "Consumed":
        return cls(int(d["batches"]), int(d.get("records", 0)), d.get("chain", "0" * 64))


def ledger_digest(ranks: list[dict]) -> str:
    """One digest over the ordered (rank, record key) lists of all ranks (their chains, in rank order)."""
    h = hashlib.sha256()
    for r, d in enumerate(ranks):
        h.update(f"{r}:{d['batches']}:{d['records']}:{d['chain']}\n".encode())
    return h.hexdigest()
