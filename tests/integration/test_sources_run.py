"""Two named sources on a weight schedule through the real stream (token caches, Ray Data, the Interleave
actor) and the real Trainer on the session's Ray: the schedule is followed, each source is accounted under its
name, and a resume either side of the switch on another number of workers consumes the uninterrupted run's
rows (same ledger digest)."""
import json
from pathlib import Path

import pytest

from common import run_config

pytestmark = pytest.mark.slow

N = 5  # the schedule switches after 5 steps: a 0.8 -> 0.3, b 0.2 -> 0.7; checkpoints at 2, 4 (N-1), 6 (N+1)...


def sources(corpus) -> tuple[str, ...]:
    d = corpus["dir"]
    return (f'data.sources.a.shards=["{d}/train-00[01].tar"]', f"data.sources.a.weight=[[0, 0.8], [{N}, 0.3]]",
            f'data.sources.b.shards=["{d}/train-00[23].tar"]', f"data.sources.b.weight=[[0, 0.2], [{N}, 0.7]]")


@pytest.fixture(scope="module")
def runs(trained, corpus, tmp_path_factory):
    from omnistream.cluster.driver import run_training

    tmp = tmp_path_factory.mktemp("sources")

    def cfg(*extra):
        return run_config(corpus, tmp, *sources(corpus), "train.steps=10", "train.zero_stage=0",
                          "cluster.num_workers=1", "train.grad_accum=2", "train.checkpoint_every=2",
                          "train.keep_checkpoints=5", "data.eval_shards=[]",
                          f'data.bundle_dir="{trained["tmp"]}/bundle"', *extra)

    whole = run_training(cfg())
    ckpts = {json.loads((Path(c) / "omnistream.json").read_text())["step"]: c for c in whole.checkpoints}
    resumed = {n: run_training(cfg("cluster.num_workers=2", f'train.resume_from="{ckpts[n]}"'))
               for n in (N - 1, N + 1)}
    return {"whole": whole, "resumed": resumed}


def _tokens(res, name):
    return dict(res.tracker.metric_history(f"data/source_tokens/{name}"))


def test_the_schedule_is_followed_and_each_source_is_accounted_under_its_name(runs):
    res = runs["whole"]
    a, b = _tokens(res, "a"), _tokens(res, "b")
    before = a[N] / (a[N] + b[N])
    after = (a[10] - a[N]) / (a[10] - a[N] + b[10] - b[N])
    # 5 steps of 8 rows: the rule keeps each source within about one row of its share
    assert abs(before - 0.8) <= 0.04 and abs(after - 0.3) <= 0.04, (before, after)
    m = res.metrics
    for name in ("a", "b"):
        assert m[f"data/source/{name}/seen"] == 240  # two shards of 120 records each
        assert m[f"data/source/{name}/seen"] == sum(m[f"data/source/{name}/{k}"] for k in ("kept", "filtered", "errored"))
        assert res.data_report["sources"][name]["kept"] == m[f"data/source/{name}/kept"]
        assert 0 <= m[f"data/source_share/{name}"] <= 1
    assert m["data/source/a/kept"] + m["data/source/b/kept"] == m["data/kept"]


def test_a_resume_either_side_of_the_switch_on_two_workers_consumes_the_same_rows(runs):
    whole = runs["whole"]
    for n, res in runs["resumed"].items():
        assert res.ledger_digest == whole.ledger_digest, n
        assert _tokens(res, "a")[10] == _tokens(whole, "a")[10], n
        assert res.metrics["data/resume/replayed_rows"] > 0, n
