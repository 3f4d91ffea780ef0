"""Packing documents into fixed-length rows for next-token training.

Each row of `seq_len` tokens holds whole documents placed by first-fit
decreasing (a document is split only when it alone is longer than a row; each
piece then counts as a document of its own). Per token the row carries:

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


def pieces(tokens: Sequence[np.ndarray], mods: Sequence[np.ndarray], keys: Sequence[str], seq_len: int):
    for t, m, k in zip(tokens, mods, keys):
        t, m = np.asarray(t, np.int64), np.asarray(m, np.int64)
        for s in range(0, max(len(t), 1), seq_len):
            if len(t[s : s + seq_len]):
                yield t[s : s + seq_len], m[s : s + seq_len], k


def pack_documents(
    tokens: Sequence[np.ndarray], mods: Sequence[np.ndarray], keys: Sequence[str], seq_len: int
) -> dict[str, np.ndarray]:
    """Pack documents into rows; returns the COLUMNS as (rows, seq_len) int64 arrays plus `keys` per row."""
    pieces_ = sorted(pieces(tokens, mods, keys, seq_len), key=lambda p: -len(p[0]))
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
