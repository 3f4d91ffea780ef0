"""Packing documents into fixed-length rows for next-token training.

Each row of `seq_len` tokens holds whole documents placed by first-fit
decreasing. A document is split only when it alone is longer than a row, and
then only where one of its parts begins (`cuts`): never inside an image's or a
clip's ids. Each piece then counts as a document of its own. (A part longer
than a row never gets here: documents.RecordProcessor filters it, counted.)
Per token the row carries:

- input_ids    the token
- labels       the next token of the SAME document, else IGNORE (-100): a label
               never crosses a document boundary, and pads carry no loss
- position_ids 0, 1, 2, … restarting at every document (rotary positions)
- doc_ids      1, 2, … per document in the row, 0 for padding (the model's
               attention mask keeps documents apart)
- modality_ids the modality index of the token (0 = bos/eos/pad)

No token is lost or duplicated: the non-pad tokens of the rows are exactly
the tokens of the documents, each once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omnistream.common.stream import COLUMNS

IGNORE = -100


def split_points(n: int, cuts, seq_len: int) -> list[int]:
    """Where a document of `n` tokens is cut into pieces of at most `seq_len` tokens: each piece as long as
    it can be while ending at a part boundary (`cuts`, the offsets where a part begins). Without cuts (None)
    anywhere. Raises ValueError for a part longer than a row, which has no place to be cut."""
    if n <= seq_len:
        return [0]
    if cuts is None:
        return list(range(0, n, seq_len))
    starts, start, last = [0], 0, 0
    for b in [*(int(c) for c in cuts), n]:
        if b - start > seq_len:
            if last == start:
                raise ValueError(f"a part of {b - start} tokens is longer than a row of {seq_len}")
            starts.append(last)
            start = last
            if b - start > seq_len:
                raise ValueError(f"a part of {b - start} tokens is longer than a row of {seq_len}")
        last = b
    return starts


def pieces(tokens: Sequence[np.ndarray], mods: Sequence[np.ndarray], keys: Sequence[str], seq_len: int, cuts=None):
    """Each document, or the pieces of one longer than a row (split_points), as (tokens, modality_ids, key)."""
    for j, (t, m, k) in enumerate(zip(tokens, mods, keys)):
        t, m = np.asarray(t, np.int64), np.asarray(m, np.int64)
        starts = split_points(len(t), None if cuts is None else cuts[j], seq_len)
        for a, b in zip(starts, [*starts[1:], len(t)]):
            if b > a:
                yield t[a:b], m[a:b], k


def pack_documents(
    tokens: Sequence[np.ndarray], mods: Sequence[np.ndarray], keys: Sequence[str], seq_len: int, cuts=None
) -> dict[str, np.ndarray]:
    """Pack documents into rows; returns the COLUMNS as (rows, seq_len) int64 arrays plus `keys` per row.
    `cuts`: per document, the offsets its parts begin at (documents.make_document)."""
    pieces_ = sorted(pieces(tokens, mods, keys, seq_len, cuts), key=lambda p: -len(p[0]))
    rows: list[list[tuple]] = []
    free: list[int] = []
    for p in pieces_:  # first-fit decreasing: O(pieces × rows), both small per window
        for i, f in enumerate(free):
            if len(p[0]) <= f:
                rows[i].append(p)
                free[i] -= len(p[0])
                break
        else:
            rows.append([p])
            free.append(seq_len - len(p[0]))
    return layout_rows(rows, seq_len)


def layout_rows(rows: Sequence[Sequence[tuple]], seq_len: int) -> dict[str, np.ndarray]:
    """Rows of (tokens, modality_ids, key) documents -> the COLUMNS as (rows, seq_len) int64 arrays plus `keys`."""
    n = len(rows)
    out = {c: np.zeros((n, seq_len), np.int64) for c in COLUMNS}
    out["labels"][:] = IGNORE
    row_keys = []
    for r, docs in enumerate(rows):
        at = 0
        for d, (t, m, _) in enumerate(docs, start=1):
            L = len(t)
            sl = slice(at, at + L)
            out["input_ids"][r, sl] = t
            out["labels"][r, at : at + L - 1] = t[1:]
            out["position_ids"][r, sl] = np.arange(L)
            out["doc_ids"][r, sl] = d
            out["modality_ids"][r, sl] = m
            at += L
        row_keys.append("\n".join(k for _, _, k in docs))
    out["keys"] = np.array(row_keys, dtype=object)
    return out
