"""Named sources: the interleaving rule over real packed-row shapes, without Ray (pipelines/sources.py).
The stream with Ray, a real Trainer and a resume on another worker count: integration/test_sources_run.py."""

import json

import numpy as np
import pytest

from omnistream.common.stream import COLUMNS, row_hash
from omnistream.pipelines.plan import plan_sources
from omnistream.pipelines.sources import Interleave, SourceConfig, resume_items

SEQ = 64


def window(src: int, j: int, rows: int, seed: int, epoch: int = 0) -> dict:
    """A packed window's columns: `rows` rows, each with a random number of document tokens."""
    rng = np.random.default_rng(seed * 1000 + src * 100 + j)
    doc = np.zeros((rows, SEQ), np.int32)
    for r, n in enumerate(rng.integers(8, SEQ + 1, rows)):
        doc[r, :n] = 1
    out = {c: doc.copy() for c in COLUMNS}
    out.update(
        keys=np.array([f"{epoch}:shard{src}:{j}-{r}" for r in range(rows)], dtype=object),
        win=np.full(rows, j, np.int64),
        row=np.arange(rows, dtype=np.int64),
        src=np.full(rows, src, np.int64),
    )
    return out


def stream(sources, windows, order, G=16, start=None, skip=None):
    """Feed the windows in `order` ((src, j) pairs) through one Interleave; all its rows, concatenated."""
    il = Interleave([s.model_dump() for s in sources], [len(w) for w in windows], G, 1, start)
    outs = []
    for s, j in order:
        b = windows[s][j]
        if skip and (s, j) in skip:
            last = skip[(s, j)]
            assert row_hash(b["keys"][last[0]]) == last[1]
            b = {c: v[last[0] + 1 :] for c, v in b.items()}
            if not len(b["keys"]):  # WindowRows' marker of an empty window
                b = {c: v[:1] for c, v in windows[s][j].items()}
                b["row"] = np.array([-1])
        outs.append(il(b))
    outs = [o for o in outs if o]
    return {c: np.concatenate([o[c] for o in outs]) for c in ("keys", "pos", "src", "state", "doc_ids")}


def tokens(rows) -> np.ndarray:
    return (rows["doc_ids"] > 0).sum(1)


def shares_per_window(rows, G, steps_per_window, S=2):
    n = len(rows["keys"]) // (G * steps_per_window)
    t, src = tokens(rows), rows["src"]
    out = []
    for w in range(n):
        sl = slice(w * G * steps_per_window, (w + 1) * G * steps_per_window)
        out.append(np.bincount(src[sl], t[sl], S) / t[sl].sum())
    return np.array(out)


def make(n_windows=(60, 60), rows=20, seed=0):
    return [[window(s, j, rows, seed) for j in range(n)] for s, n in enumerate(n_windows)]


def test_two_sources_at_0_8_and_0_2_hold_their_token_share_in_every_window_of_50_steps():
    sources = [SourceConfig(shards=["a"], weight=0.8), SourceConfig(shards=["b"], weight=0.2)]
    windows = make((120, 40))
    order = [(0, j) for j in range(120)] + [(1, j) for j in range(40)]  # a poor reading order: all of a first
    rows = stream(sources, windows, order, G=8)
    both = np.flatnonzero(rows["src"] == 0).max()  # from here on only b is left (a's windows are all dealt)
    shares = shares_per_window({c: v[:both] for c, v in rows.items()}, 8, 50)
    assert len(shares) >= 6
    assert np.abs(shares - [0.8, 0.2]).max() <= 0.02, shares
    # every row dealt once, each source's rows in their own order
    assert len(set(rows["keys"])) == len(rows["keys"])
    for s in (0, 1):
        got = [k for k, x in zip(rows["keys"], rows["src"]) if x == s]
        assert got == [k for w in windows[s] for k in w["keys"]][: len(got)]


def test_the_stream_does_not_depend_on_the_order_windows_are_read_in():
    sources = [SourceConfig(shards=["a"], weight=0.5), SourceConfig(shards=["b"], weight=0.5)]
    windows = make((30, 30))
    a = stream(sources, windows, [(0, j) for j in range(30)] + [(1, j) for j in range(30)])
    b = stream(sources, windows, [p for j in range(30) for p in ((1, j), (0, j))])
    assert list(a["keys"]) == list(b["keys"])


def test_a_schedule_switching_at_step_n_is_followed_and_a_resume_either_side_of_it_continues_the_same_stream():
    G, N = 8, 60
    sources = [
        SourceConfig(shards=["a"], weight=[(0, 0.8), (N, 0.3)]),
        SourceConfig(shards=["b"], weight=[(0, 0.2), (N, 0.7)]),
    ]
    windows = make((80, 80))
    order = [p for j in range(80) for p in ((0, j), (1, j))]
    whole = stream(sources, windows, order, G)
    step = whole["pos"] // G
    t = tokens(whole)
    for lo, hi, want in ((10, N, 0.8), (N, N + 50, 0.3)):
        sel = (step >= lo) & (step < hi)
        assert abs(t[sel & (whole["src"] == 0)].sum() / t[sel].sum() - want) <= 0.02
    for at in ((N - 1) * G + 3, (N + 1) * G - 1):  # mid-step N-1, and the last row of step N
        state = json.loads(whole["state"][at])
        items, skip = resume_items([{"src": s, "window": j, "ranges": ""} for s, j in order], state)
        rest = stream(
            sources,
            windows,
            [(i["src"], i["window"]) for i in items],
            G,
            start={"position": at + 1, **state},
            skip={tuple(map(int, k.split(":"))): v for k, v in skip.items()},
        )
        n = min(len(rest["keys"]), 400)
        assert n == 400
        assert list(rest["keys"][:n]) == list(whole["keys"][at + 1 : at + 1 + n])
        assert list(rest["pos"][:n]) == list(whole["pos"][at + 1 : at + 1 + n])


def test_a_stopped_source_leaves_the_mix_and_the_others_take_its_share():
    sources = [SourceConfig(shards=["a"], weight=0.5), SourceConfig(shards=["b"], weight=0.5, exhausted="stop")]
    windows = make((40, 5))
    rows = stream(sources, windows, [p for j in range(40) for p in ([(0, j)] + ([(1, j)] if j < 5 else []))])
    src = rows["src"]
    last_b = np.flatnonzero(src == 1).max()
    assert (src == 1).sum() == 5 * 20  # every row of the small source, once
    assert (src[last_b + 1 :] == 0).all() and len(src) == 45 * 20  # then the other alone, to its end


def test_repeat_plans_the_epochs_a_small_source_needs_and_stop_its_own():
    metas = [{f"a{i}": {"rows": 100, "ids": 100 * 60} for i in range(4)}, {"b0": {"rows": 10, "ids": 10 * 60}}]
    shards = [list(metas[0]), list(metas[1])]
    for exhausted, want in (("repeat", None), ("stop", 2)):
        sources = [
            SourceConfig(shards=["a*"], weight=0.5),
            SourceConfig(shards=["b*"], weight=0.5, exhausted=exhausted, epochs=2),
        ]
        plans, windows, items = plan_sources(
            ["a", "b"], sources, shards, metas, seed=3, window=16, steps=100, step_tokens=16 * SEQ
        )
        epochs = plans[1][-1][0] + 1
        if want:
            assert epochs == want
        else:  # 100 steps x 1024 tokens x 0.5 from a source of 640 tokens: 80 epochs and one to spare
            assert epochs >= 80
        assert {(i["src"], i["window"]) for i in items} == {(s, j) for s in (0, 1) for j in range(len(windows[s]))}
    # each epoch of a source is its own seeded order
    orders = [[s for e, s in plans[0] if e == k] for k in range(plans[0][-1][0] + 1)]
    assert len({tuple(o) for o in orders}) > 1


def test_a_repeat_source_beside_a_stop_source_lasts_to_train_steps():
    """A `repeat` 0.5 beside B `stop` 0.5: once B has left, A takes every row, so A must be planned for the whole
    run (it was planned for half and the stream ended at step 55 of 100). Every document fills one row here, so
    the rows the plan gives are the rows the stream can deal."""
    steps, G = 100, 16
    metas = [
        {f"a{i}": {"rows": 100, "ids": 100 * (SEQ - 4)} for i in range(4)},
        {"b0": {"rows": 10, "ids": 10 * (SEQ - 4)}},
    ]
    sources = [SourceConfig(shards=["a*"], weight=0.5), SourceConfig(shards=["b*"], weight=0.5, exhausted="stop")]
    plans, windows, items = plan_sources(
        ["a", "b"],
        sources,
        [list(metas[0]), list(metas[1])],
        metas,
        seed=3,
        window=16,
        steps=steps,
        step_tokens=G * SEQ,
    )
    full = [
        [
            {
                **window(s, j, sum(b - a for _, a, b in w), 0),
                "doc_ids": np.ones((sum(b - a for _, a, b in w), SEQ), np.int32),
            }
            for j, w in enumerate(windows[s])
        ]
        for s in (0, 1)
    ]
    rows = stream(sources, full, [(i["src"], i["window"]) for i in items], G=G)
    assert len(rows["keys"]) >= steps * G, f"the stream ended at step {len(rows['keys']) // G} of {steps}"
    assert (rows["src"] == 1).sum() == 10  # B once, as `stop` with one epoch says


def test_weights_whose_sum_is_not_a_usable_number_are_refused():
    from omnistream.pipelines.config import DataConfig

    with pytest.raises(ValueError, match="sum to inf"):
        DataConfig(sources={"a": {"shards": ["x"], "weight": 1e308}, "b": {"shards": ["y"], "weight": 1e308}})
    with pytest.raises(ValueError, match="sum to 2e-13"):
        DataConfig(sources={"a": {"shards": ["x"], "weight": 1e-13}, "b": {"shards": ["y"], "weight": 1e-13}})


@pytest.mark.parametrize(
    "weight,err",
    [([(1, 0.5)], "starts at step 0"), ([(0, 0.5), (0, 0.2)], "increase"), (-1.0, ">= 0"), ([(0, -0.1)], ">= 0")],
)
def test_a_bad_weight_is_refused_in_plain_words(weight, err):
    with pytest.raises(ValueError, match=err):
        SourceConfig(shards=["x"], weight=weight)


def test_a_source_named_like_a_path_or_a_step_with_no_weight_at_all_is_refused():
    from omnistream.pipelines.config import DataConfig

    for name in ("a/b", ".", "..", "a.b", ""):
        with pytest.raises(ValueError, match="source names"):
            DataConfig(sources={name: {"shards": ["x"]}})
    with pytest.raises(ValueError, match="from step 10 every source's weight is 0"):
        DataConfig(sources={"a": {"shards": ["x"], "weight": [[0, 1], [10, 0]]}, "b": {"shards": ["y"], "weight": 0}})


def test_with_a_token_mixture_sources_are_dealt_a_whole_micro_batch_at_a_time():
    """data.mix set: the unit is one mixer batch (micro_batch_size rows), so every micro-batch comes from one
    source whole, and keeps the modality shares the mixer gave it."""
    sources = [SourceConfig(shards=["a"], weight=0.7), SourceConfig(shards=["b"], weight=0.3)]
    windows = make((20, 20), rows=16)
    il = Interleave([s.model_dump() for s in sources], [20, 20], 8, 4)
    outs = [il(windows[s][j]) for j in range(20) for s in (0, 1)]
    rows = {c: np.concatenate([o[c] for o in outs if o]) for c in ("keys", "src", "doc_ids")}
    src = rows["src"][: len(rows["src"]) // 4 * 4].reshape(-1, 4)
    assert (src == src[:, :1]).all()  # each micro-batch of 4 rows from one source
    both = np.flatnonzero(rows["src"] == 0).max() + 1  # then a is used up and b goes on alone
    t, s = tokens(rows)[:both], rows["src"][:both]
    assert abs(t[s == 0].sum() / t.sum() - 0.7) <= 0.02
