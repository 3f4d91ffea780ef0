"""Token mixture: per-rank batches whose TOKEN shares per modality meet configured targets.

Counting tokens, not samples: a 1 024-token image and a 12-token caption weigh what
they cost the model. A token's modality is the one `Vocabulary.document` gives it
(its block and its begin/end markers); bos/eos/pad belong to none and are left out
of the shares.

How: the packing actor sees a window of documents (data.mix.window). From it the
mixer builds batches of `rows` rows (one micro-batch: a global batch is
workers × grad_accum of them, and its shares are their token-weighted mean, inside
the same tolerance; one micro-batch, not one rank-step, so that the stream does not
depend on grad_accum or the number of workers, and a resume on other workers reads
the same rows).
Each batch is filled greedily: the next document is the one that brings the
batch's shares closest to the targets, placed first-fit into a row. A batch that misses the tolerance (the window ran
out of a scarce modality)
is not emitted; its documents and the window's leftovers are surplus of the
abundant modalities, dropped and COUNTED (data/mix_dropped, per modality in
tokens), never silently. Nothing is carried between windows, so the output is a
pure function of the window: a resumed run rebuilds the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from omnistream.common.stream import shares_of, token_counts

from .packing import layout_rows, pieces


class MixConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shares: dict[str, float] = Field(
        default_factory=dict,
        description="target share of TOKENS per modality in every global batch, e.g. {text = 0.3, image = 0.4, audio "
        "= 0.3}; empty = no mixing (documents packed as they come)",
    )
    tolerance: float = Field(
        0.05, gt=0, lt=1, description="largest allowed |achieved - target| token share, per modality and global batch"
    )
    window: int = Field(
        2048,
        ge=16,
        description="documents the mixer chooses from at once (replaces data.pack_window); several batches' worth, "
        "since each window's surplus is dropped",
    )

    @field_validator("shares")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            return v
        bad = {k: s for k, s in v.items() if not 0 <= s <= 1}
        if bad:
            raise ValueError(f"token shares must lie in [0, 1]: {bad}")
        total = sum(v.values())
        if abs(total - 1) > 1e-6:
            raise ValueError(f"token shares must add up to 1, they add up to {total:g}")
        return v

    @property
    def on(self) -> bool:
        return bool(self.shares)


def mix_pack(
    tokens: Sequence[np.ndarray],
    mods: Sequence[np.ndarray],
    keys: Sequence[str],
    seq_len: int,
    rows: int,
    target: np.ndarray,
    tolerance: float,
    cuts=None,
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Pack a window of documents into batches of `rows` rows meeting `target` (shares per modality index 1..n).

    Returns (the packed columns of all emitted batches, back to back; dropped tokens per modality;
    dropped documents). The number of rows returned is always a multiple of `rows`.
    """
    n = len(target)
    docs = list(pieces(tokens, mods, keys, seq_len, cuts))
    lengths = np.array([len(t) for t, _, _ in docs], dtype=np.int64)
    counts = np.stack([token_counts(m, n) for _, m, _ in docs]) if docs else np.zeros((0, n), np.int64)
    left = np.ones(len(docs), dtype=bool)
    batches: list[list[list[int]]] = []
    while left.any():
        free = np.full(rows, seq_len)
        placed: list[list[int]] = [[] for _ in range(rows)]
        have = np.zeros(n)
        taken: list[int] = []
        while True:
            fits = left & (lengths <= free.max())
            if not fits.any():
                break
            # the document that brings the batch's shares closest to the target (squared distance)
            after = have + counts
            dist = ((after / np.maximum(after.sum(1, keepdims=True), 1) - target) ** 2).sum(1)
            d = int(np.argmin(np.where(fits, dist, np.inf)))
            r = int(np.argmax(free >= lengths[d]))  # first row it fits in
            placed[r].append(d)
            free[r] -= lengths[d]
            have += counts[d]
            left[d] = False
            taken.append(d)
        if np.abs(shares_of(have) - target).max() > tolerance:
            left[taken] = True  # this batch cannot be mixed from what is left: all of it is surplus
            break
        batches.append(placed)
    dropped = counts[left].sum(0) if left.any() else np.zeros(n, np.int64)
    out_rows = [[docs[d] for d in row] for placed in batches for row in placed]
    return layout_rows(out_rows, seq_len), dropped, int(left.sum())
