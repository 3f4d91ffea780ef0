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
    parts_per_document: Counter = field(default_factory=Counter)  # parts a kept document has -> documents
    parts: dict = field(default_factory=dict)  # modality -> Counter(kept, dropped): the parts of kept records
    parts_dropped: Counter = field(default_factory=Counter)  # reason -> parts dropped (data.drop_bad_parts)
    documents_split: int = 0  # kept documents longer than a row (split where a part begins when packed)

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
        if o.status == "kept":
            if o.part_mods:
                self.parts_per_document[len(o.part_mods)] += 1
            for name in o.part_mods:
                self.parts.setdefault(name, Counter())["kept"] += 1
            self.documents_split += int(o.long)
        for name, reason in o.dropped:
            self.parts.setdefault(name, Counter())["dropped"] += 1
            self.parts_dropped[reason] += 1
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
        for mine, theirs in (
            (self.per_modality, other.per_modality),
            (self.per_shard, other.per_shard),
            (self.parts, other.parts),
        ):
            for k, c in theirs.items():
                mine.setdefault(k, Counter()).update(c)
        self.shard_errors += other.shard_errors
        for d in other.dead_letter:
            self._letter(d)
        self.dead_letter_dropped += other.dead_letter_dropped
        self.mix_dropped += other.mix_dropped
        self.mix_dropped_tokens.update(other.mix_dropped_tokens)
        self.unconsumed.update(other.unconsumed)
        self.parts_per_document.update(other.parts_per_document)
        self.parts_dropped.update(other.parts_dropped)
        self.documents_split += other.documents_split

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
            "parts_per_document": {str(k): v for k, v in self.parts_per_document.items()},
            "parts": {k: dict(v) for k, v in self.parts.items()},
            "parts_dropped": dict(self.parts_dropped),
            "documents_split": self.documents_split,
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
            Counter({int(k): v for k, v in d.get("parts_per_document", {}).items()}),
            {k: Counter(v) for k, v in d.get("parts", {}).items()},
            Counter(d.get("parts_dropped", {})),
            d.get("documents_split", 0),
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
        m.update({f"data/parts_dropped/{k}": v for k, v in self.parts_dropped.items()})
        for name, c in self.parts.items():
            m.update({f"data/parts/{name}/{k}": v for k, v in c.items()})
        if self.documents_split:
            m["data/documents_split"] = self.documents_split
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
            "parts": {
                "per_document": {str(k): v for k, v in sorted(self.parts_per_document.items())},
                "per_modality": {
                    k: {"kept": v["kept"], "dropped": v["dropped"]} for k, v in sorted(self.parts.items())
                },
                "dropped": dict(sorted(self.parts_dropped.items())),
            },
            "documents_split": self.documents_split,
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
