import numpy as np
import pytest

from omnistream.common.stream import label_modalities, shares_of, token_counts
from omnistream.pipelines.mixing import mix_pack
from omnistream.pipelines.packing import IGNORE, pack_documents


def _docs(rng, n, max_len):
    lens = rng.integers(1, max_len, n)
    toks = [rng.integers(3, 1000, L) for L in lens]
    mods = [rng.integers(0, 4, L) for L in lens]
    return toks, mods, [f"k{i}" for i in range(n)]


@pytest.mark.parametrize("seed,max_len,seq_len", [(0, 40, 64), (1, 200, 64), (2, 64, 64), (3, 5, 16)])
def test_no_token_lost_or_duplicated(seed, max_len, seq_len):
    rng = np.random.default_rng(seed)
    toks, mods, keys = _docs(rng, 50, max_len)
    out = pack_documents(toks, mods, keys, seq_len)
    assert out["input_ids"].shape[1] == seq_len
    # every document's tokens appear exactly once, contiguous, with positions restarting at 0
    pieces = []
    for r in range(len(out["input_ids"])):
        d = out["doc_ids"][r]
        for doc in np.unique(d[d > 0]):
            idx = np.flatnonzero(d == doc)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a document is contiguous"
            assert np.array_equal(out["position_ids"][r, idx], np.arange(len(idx)))
            pieces.append(tuple(out["input_ids"][r, idx]))
    expected = []
    for t in toks:
        expected += [tuple(t[s : s + seq_len]) for s in range(0, len(t), seq_len)]
    assert sorted(pieces) == sorted(expected)
    assert (out["input_ids"][out["doc_ids"] == 0] == 0).all(), "padding is pad id"


def test_labels_never_cross_a_document_and_pads_carry_no_loss():
    rng = np.random.default_rng(7)
    toks, mods, keys = _docs(rng, 30, 30)
    out = pack_documents(toks, mods, keys, 48)
    ids, lab, doc = out["input_ids"], out["labels"], out["doc_ids"]
    for r in range(len(ids)):
        for i in range(48):
            if lab[r, i] != IGNORE:
                assert i + 1 < 48 and doc[r, i] == doc[r, i + 1] and doc[r, i] > 0
                assert lab[r, i] == ids[r, i + 1]
            elif doc[r, i] > 0 and i + 1 < 48:
                assert doc[r, i + 1] != doc[r, i], "only a document's last token lacks a label"
    assert (lab[doc == 0] == IGNORE).all()
    # each row lists the keys of its documents
    assert sum(len(k.split("\n")) for k in out["keys"]) == 30


def test_label_modalities_are_the_next_tokens():
    m = np.array([[0, 1, 1, 2, 2, 0]])
    assert label_modalities(m).tolist() == [[1, 1, 2, 2, 0, 0]]


def test_first_fit_decreasing_fills_rows():
    toks = [np.arange(1, 33)] * 4 + [np.arange(1, 17)] * 8
    out = pack_documents(toks, [np.zeros(len(t)) for t in toks], [str(i) for i in range(12)], 64)
    assert len(out["input_ids"]) == 4 and (out["doc_ids"] > 0).all()


# ---- token mixture ------------------------------------------------------------------------------
def _skewed_docs(n=1500, seed=0):
    """Documents far from the target mix: mostly images (long, with a caption), few texts, some audio."""
    rng = np.random.default_rng(seed)
    toks, mods, keys = [], [], []
    for i in range(n):
        kind = int(rng.choice(3, p=[0.2, 0.7, 0.1]))
        L = (12, 40, 60)[kind] + int(rng.integers(0, 8))
        m = np.full(L, kind + 1)
        m[0] = m[-1] = 0  # bos / eos belong to no modality
        if kind == 1:
            m[1:8] = 1  # the image's caption is text
        toks.append(np.arange(L) + 3)
        mods.append(m)
        keys.append(f"d{i}")
    return toks, mods, keys


TARGET = np.array([0.3, 0.4, 0.3])


def _batch_devs(out, rows):
    n = len(out["keys"]) // rows
    return [
        np.abs(shares_of(token_counts(out["modality_ids"][b * rows : (b + 1) * rows], 3)) - TARGET).max()
        for b in range(n)
    ]


def test_mixer_meets_token_shares_and_accounts_for_every_token():
    toks, mods, keys = _skewed_docs()
    rows, seq = 16, 256
    out, dropped, n_dropped = mix_pack(toks, mods, keys, seq, rows, TARGET, 0.05)
    assert len(out["keys"]) % rows == 0 and len(out["keys"]) >= 4 * rows
    devs = _batch_devs(out, rows)
    assert max(devs) <= 0.05, devs
    # every token is either in a row or counted as dropped surplus, once
    emitted = token_counts(out["modality_ids"], 3)
    assert (emitted + dropped == sum(token_counts(m, 3) for m in mods)).all()
    assert n_dropped + sum(len(k.split("\n")) for k in out["keys"]) == len(keys)
    assert (out["doc_ids"] > 0).mean() > 0.9, "rows stay well filled"


def test_mixer_off_misses_the_same_shares():
    """The control for the test above: plain packing of the same documents is far off the target,
    so that test would fail with the mixer switched off."""
    toks, mods, keys = _skewed_docs()
    out = pack_documents(toks, mods, keys, 256)
    out = {k: v[: len(v) // 16 * 16] for k, v in out.items()}
    assert min(_batch_devs(out, 16)) > 0.1
