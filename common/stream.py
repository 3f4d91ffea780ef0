"""The token stream's contract between pipelines/ (which makes it) and training/ (which consumes it),
here so that neither room imports the other:

- a packed batch's columns (`COLUMNS`), and the modality of each label (`label_modalities`);
- tokens per modality in a batch and their shares (`token_counts`, `shares_of`): the mixer meets the
  shares, the Trainer logs them;
- a row's identity (`row_hash`) and the data position a checkpoint records (`DataPosition`): the Trainer
  keeps it, the stream resumes from it.

Standard library and numpy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

COLUMNS = ("input_ids", "labels", "position_ids", "doc_ids", "modality_ids")


def label_modalities(modality_ids: np.ndarray) -> np.ndarray:
    """The modality of each label (= of the next token); the last column never has a label."""
    out = np.zeros_like(modality_ids)
    out[..., :-1] = modality_ids[..., 1:]
    return out


def token_counts(modality_ids: np.ndarray, n_mods: int) -> np.ndarray:
    """Tokens per modality index 1..n_mods (index 0 = specials and padding is dropped)."""
    return np.bincount(np.asarray(modality_ids).ravel(), minlength=n_mods + 1)[1 : n_mods + 1]


def shares_of(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts))


MOD = 1 << 256


def row_hash(keys: str) -> str:
    """A packed row's identity: the record keys of its documents, in order."""
    return hashlib.sha256(str(keys).encode("utf-8", "surrogateescape")).hexdigest()[:32]


@dataclass
class DataPosition:
    """Where a run stands in the global row stream (pipelines/rows.py): a few numbers, however long the run.

    rows      rows of the global stream consumed, all ranks together
    records   document keys in them (a document cut across rows counts once per piece)
    digest    the sum, mod 2^256, of sha256("<position>:<keys>") over every consumed row: the same rows
              at the same places of the stream give the same digest whichever rank consumed them and
              on however many ranks, and a row repeated, skipped or moved changes it
    last      the stream's last consumed row: its window, row in the window, hash and position; where a
              resumed stream restarts (and what it checks)
    """

    rows: int = 0
    records: int = 0
    digest: int = 0
    last: dict | None = None

    def add_row(self, pos: int, keys: str, window: int, row: int, state: str | None = None) -> None:
        keys = str(keys)
        self.rows += 1
        self.records += keys.count("\n") + 1
        self.digest = (
            self.digest
            + int.from_bytes(hashlib.sha256(f"{pos}:{keys}".encode("utf-8", "surrogateescape")).digest(), "big")
        ) % MOD
        if self.last is None or pos > self.last["pos"]:
            self.last = {"window": int(window), "row": int(row), "pos": int(pos), "keys": keys}
            if state is not None:  # named sources: the interleaving state after this row (JSON)
                self.last["state"] = state

    def merged(self, others: list[DataPosition]) -> DataPosition:
        """This position (the start) advanced by what each rank consumed since."""
        out = DataPosition(self.rows, self.records, self.digest, self.last)
        for o in others:
            out.rows += o.rows
            out.records += o.records
            out.digest = (out.digest + o.digest) % MOD
            if o.last is not None and (out.last is None or o.last["pos"] > out.last["pos"]):
                out.last = o.last
        return out

    def to_json(self) -> dict:
        last = (
            None
            if self.last is None
            else {
                "window": self.last["window"],
                "row": self.last["row"],
                "pos": self.last["pos"],
                "row_hash": self.last.get("row_hash") or row_hash(self.last["keys"]),
            }
        )
        if last is not None and self.last.get("state") is not None:
            st = self.last["state"]
            last["state"] = json.loads(st) if isinstance(st, str) else st
        return {"rows": self.rows, "records": self.records, "digest": f"{self.digest:064x}", "last": last}

    @classmethod
    def from_json(cls, d: dict) -> DataPosition:
        return cls(int(d["rows"]), int(d["records"]), int(d["digest"], 16), d.get("last"))

    def ledger_digest(self) -> str:
        return f"{self.digest:064x}"
