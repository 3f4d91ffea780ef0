"""Data accounting: every record read is counted once as kept, filtered or errored.

Plain data and arithmetic, no Ray. The `DataLedger`
Ray actor that gathers tallies from the pipeline's actors lives in ledger.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# the data position and a row's identity are the stream's contract with the Trainer (common/stream.py)

MAX_DEAD_LETTERS = 10_000  # beyond this, dead letters are counted but not listed


@dataclass
class Tally:
    seen: int = 0
    kept: int = 0
    filtered: Counter = field(default_factory=Counter)
    errored: Counter = field(default_factory=Counter)
    per_modality: dict = field(default_factory=dict)  # modality -> Counter(seen, kept, filtered, errored)
    per_shard: dict = field(default_factory=dict)  # shard -> Counter(seen, kept, filtered, errored)
    shard_errors: list = field(default_factory=list)  # {shard, reason, detail}: shards that failed as a whole
    dead_letter: list = field(default_factory=list)  # {shard, key, field, status, reason, detail}
    dead_letter_dropped: int = 0
    mix_dropped: int = 0  # kept documents the token mixer left out (surplus)
    mix_dropped_tokens: Counter = field(default_factory=Counter)  # modality -> tokens in them
    unconsumed: Counter = field(default_factory=Counter)  # extension -> members no modality reads (a .gif)

    def count(self, shard: str, key: str, o) -> None:
        """Account one record's Outcome (pipelines.stream) exactly once."""
        self.seen += 1
        if o.status == "kept":
            self.kept += 1
        else:
            (self.filtered if o.status == "filtered" else self.errored)[o.reason] += 1
            self._letter(
                {
                    "shard": shard,
                    "key": key,
                    "field": o.field,
                    "status": o.status,
                    "reason": o.reason,
                    "detail": o.detail,
                }
            )
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

    def add(self, other: Tally) -> None:
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
        self.unconsumed.update(other.unconsumed)

    def to_json(self) -> dict:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "filtered": dict(self.filtered),
            "errored": dict(self.errored),
            "per_modality": {k: dict(v) for k, v in self.per_modality.items()},
            "per_shard": {k: dict(v) for k, v in self.per_shard.items()},
            "shard_errors": self.shard_errors,
            "dead_letter": self.dead_letter,
            "dead_letter_dropped": self.dead_letter_dropped,
            "mix_dropped": self.mix_dropped,
            "mix_dropped_tokens": dict(self.mix_dropped_tokens),
            "unconsumed": dict(self.unconsumed),
        }

    @classmethod
    def from_json(cls, d: dict) -> Tally:
        return cls(
            d["seen"],
            d["kept"],
            Counter(d["filtered"]),
            Counter(d["errored"]),
            {k: Counter(v) for k, v in d["per_modality"].items()},
            {k: Counter(v) for k, v in d["per_shard"].items()},
            list(d["shard_errors"]),
            list(d["dead_letter"]),
            d["dead_letter_dropped"],
            d.get("mix_dropped", 0),
            Counter(d.get("mix_dropped_tokens", {})),
            Counter(d.get("unconsumed", {})),
        )

    def source_counts(self) -> dict[str, int]:
        """seen / kept / filtered / errored, each one number (data/source/<name>/...)."""
        return {
            "seen": self.seen,
            "kept": self.kept,
            "filtered": sum(self.filtered.values()),
            "errored": sum(self.errored.values()) + len(self.shard_errors),
        }

    def balanced(self) -> bool:
        return self.seen == self.kept + sum(self.filtered.values()) + sum(self.errored.values())

    def metrics(self) -> dict[str, float]:
        m = {"data/seen": self.seen, "data/kept": self.kept}
        m.update({f"data/filtered/{k}": v for k, v in self.filtered.items()})
        m.update({f"data/errored/{k}": v for k, v in self.errored.items()})
        for reason, n in Counter(e["reason"] for e in self.shard_errors).items():
            m[f"data/shard_errors/{reason}"] = n
        if self.mix_dropped:
            m["data/mix_dropped"] = self.mix_dropped
            m.update({f"data/mix_dropped_tokens/{k}": v for k, v in self.mix_dropped_tokens.items()})
        m.update({f"data/unconsumed/{k}": v for k, v in self.unconsumed.items()})
        return m

    def unconsumed_line(self) -> str | None:
        """One line for the log about members no modality reads, or None."""
        if not self.unconsumed:
            return None
        top = ", ".join(f".{k} ({v})" for k, v in self.unconsumed.most_common(5))
        return (
            f"{sum(self.unconsumed.values())} record members no configured modality reads were passed over: "
            f"{top}; their records were kept with what was read (data/unconsumed/<ext>)"
        )

    def report(self) -> dict:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "filtered": dict(self.filtered),
            "errored": dict(self.errored),
            "balanced": self.balanced(),
            "per_modality": {k: dict(v) for k, v in sorted(self.per_modality.items())},
            "per_shard": {k: dict(v) for k, v in sorted(self.per_shard.items())},
            "shard_errors": self.shard_errors,
            "dead_letter": self.dead_letter,
            "dead_letter_not_listed": self.dead_letter_dropped,
            "mix_dropped": {"documents": self.mix_dropped, "tokens": dict(self.mix_dropped_tokens)},
            "unconsumed": dict(sorted(self.unconsumed.items())),
        }


def error_rate_verdict(t: Tally, max_rate: float, window: int, final: bool = False) -> str | None:
    """A one-line reason to stop, judged once `window` records were seen (or at the end of a short pass)."""
    # a shard that failed as a whole (unreadable, cut short, gone) counts as one bad read beside the records
    shards = Counter(e["reason"] for e in t.shard_errors)
    total = t.seen + sum(shards.values())
    if total == 0 or (total < window and not final):
        return None
    bad = sum(t.errored.values()) + sum(shards.values())
    if bad / total > max_rate:
        top = ", ".join(
            f"{k} ({v})" for k, v in (t.errored + Counter({f"shard:{k}": v for k, v in shards.items()})).most_common(3)
        )
        return (
            f"{bad} of the first {total} records and shards could not be read ({top}), more than "
            f"data.max_error_rate={max_rate}: are the shards the data you meant?"
        )
    return None
