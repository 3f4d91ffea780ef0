import numpy as np
import pytest

from pipelines.packing import IGNORE, label_modalities, pack_documents


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
        expected += [tuple(t[s:s + seq_len]) for s in range(0, len(t), seq_len)]
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
    out = pack_documents(toks, [np.zeros(len(t))for t in toks], [str(i) for i in range(12)], 64)
    assert len(out["input_ids"]) == 4 and (out["doc_ids"] > 0).all()
