"""Two named sources on a weight schedule, one of Parquet files and one of folders of media files (the
corpus's tar records converted, tests/common), kept in object storage, through the real stream (token caches,
Ray Data, the Interleave actor) and the real Trainer on the session's Ray, against the session's S3 server
on 127.0.0.1 (tests/conftest.py `s3_server`): shards, token caches and Ray Train's checkpoints all in S3.
The schedule is followed, each source is accounted under its name, a resume from an S3 checkpoint made before
the switch, on another number of workers and across the switch, consumes the uninterrupted run's rows (same
ledger digest), and the store's key and secret are in nothing the runs record. (A resume after a switch, and
8 -> 3 -> 8 ranks across one: tests/system/test_scale.py.)"""

import glob
import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from common import MEDIA_OPTIONS, LogLines, S3Server, folder_of, mlflow_client, parquet_of, run_config, tar_records
from common import S3_BUCKET as BUCKET

pytestmark = pytest.mark.slow

N = 5  # the schedule switches after 5 steps: a 0.8 -> 0.3, b 0.2 -> 0.7; checkpoints at 2, 4 (N-1), 6...


@pytest.fixture(scope="module")
def runs(trained, corpus, s3_corpus, tmp_path_factory):
    """The uninterrupted run (1 worker, grad_accum 2, ZeRO-3) and a run resumed from its S3 checkpoint at step
    N-1 on 2 workers (DeepSpeed's universal form, converted and kept in S3)."""
    import ray

    from omnistream.cluster.driver import run_training

    tmp = tmp_path_factory.mktemp("sources")
    # the corpus's tar shards as a user's data would come: two Parquet files (Hugging Face media structs,
    # documents in list columns) for source a, two folders of files for source b, all in S3
    for i in (0, 1):
        recs = tar_records(corpus["train"][i])
        s3_corpus.put(parquet_of(recs, tmp / f"a-{i}.parquet"), f"{BUCKET}/own/a-{i}.parquet")
    for i in (2, 3):
        s3_corpus.put(folder_of(tar_records(corpus["train"][i]), tmp / f"b-{i}"), f"{BUCKET}/own/b-{i}", recursive=True)
    opts = json.dumps(MEDIA_OPTIONS).replace('":', '"=')  # as one TOML inline table

    def cfg(*extra):
        return run_config(
            corpus,
            tmp,
            f'data.sources.a.shards=["s3://{BUCKET}/own/a-*.parquet"]',
            'data.sources.a.format="parquet"',
            f"data.sources.a.format_options={opts}",
            f"data.sources.a.weight=[[0, 0.8], [{N}, 0.3]]",
            f'data.sources.b.shards=["s3://{BUCKET}/own/b-{{2..3}}"]',
            'data.sources.b.format="folder"',
            f"data.sources.b.weight=[[0, 0.2], [{N}, 0.7]]",
            f'data.token_cache="s3://{BUCKET}/sources/cache"',
            f'cluster.storage_path="s3://{BUCKET}/sources/ray"',
            "train.steps=10",
            "cluster.num_workers=1",
            "train.grad_accum=2",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=5",
            "data.eval_shards=[]",
            f'data.bundle_dir="{trained["tmp"]}/bundle"',
            *extra,
        )

    copies = f"{tempfile.gettempdir()}/omnistream-checkpoint-*"  # training.checkpoint.local_copy's folders
    before = set(glob.glob(copies))
    t0 = time.time()
    with LogLines() as lines:
        whole = run_training(cfg())
        steps = {
            json.loads(s3_corpus.cat_file(f"{c[len('s3://') :]}/omnistream.json"))["step"]: c for c in whole.checkpoints
        }
        resumed = run_training(cfg("cluster.num_workers=2", f'train.resume_from="{steps[N - 1]}"'))
    # what every Ray process of the session wrote while the runs ran (the workers' stdout and stderr included)
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    ray_logs = [p.read_bytes() for p in logs.rglob("*") if p.is_file() and p.stat().st_mtime >= t0]
    return {
        "whole": whole,
        "resumed": resumed,
        "steps": steps,
        "driver_log": "\n".join(lines.lines),
        "copies_left": sorted(set(glob.glob(copies)) - before),
        "ray_logs": ray_logs,
    }


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
        assert m[f"data/source/{name}/seen"] == sum(
            m[f"data/source/{name}/{k}"] for k in ("kept", "filtered", "errored")
        )
        assert res.data_report["sources"][name]["kept"] == m[f"data/source/{name}/kept"]
        assert 0 <= m[f"data/source_share/{name}"] <= 1
    assert m["data/source/a/kept"] + m["data/source/b/kept"] == m["data/kept"]


def test_the_caches_and_checkpoints_are_in_s3_and_a_resume_from_them_on_two_workers_consumes_the_same_rows(
    runs, s3_corpus
):
    whole = runs["whole"]
    for name in ("a", "b"):  # each source's cache, complete: a parquet and its completion record per shard
        files = s3_corpus.ls(f"{BUCKET}/sources/cache/{name}/shards")
        assert sum(f.endswith(".parquet") for f in files) == 2 and sum(f.endswith(".json") for f in files) == 2
    assert sorted(runs["steps"]) == [2, 4, 6, 8, 10]
    assert all(c.startswith(f"s3://{BUCKET}/sources/ray/") for c in whole.checkpoints)
    assert whole.checkpoint == runs["steps"][10]
    assert s3_corpus.find(f"{BUCKET}/sources/ray/universal")  # the universal form, kept in S3 for every node
    # converted in a private folder of its own, removed once uploaded: never at `<download>-universal`, a name
    # beside the download that another user could guess and plant a converted.json (or a link) in
    assert not glob.glob(f"{tempfile.gettempdir()}/omnistream-checkpoint-*-universal")
    assert not glob.glob(f"{tempfile.gettempdir()}/omnistream-universal-*")
    # the copies of the S3 checkpoint that the driver and each rank read the resume from: removed once loaded
    assert runs["copies_left"] == []
    res = runs["resumed"]
    assert res.ledger_digest == whole.ledger_digest
    assert _tokens(res, "a")[10] == _tokens(whole, "a")[10]
    assert res.metrics["data/resume/replayed_rows"] > 0


def test_the_stores_key_and_secret_are_in_no_param_tag_log_checkpoint_or_cache(runs, s3_corpus):
    secret, key = S3Server.SECRET, os.environ["AWS_ACCESS_KEY_ID"]
    for res in (runs["whole"], runs["resumed"]):
        run = mlflow_client(res.tracking_uri).get_run(res.run_id)
        recorded = json.dumps(run.data.params) + json.dumps(run.data.tags)
        assert secret not in recorded and key not in recorded
    assert runs["driver_log"] and secret not in runs["driver_log"] and key not in runs["driver_log"]
    assert runs["ray_logs"] and not any(secret.encode() in b or key.encode() in b for b in runs["ray_logs"])
    for what in ("ray", "cache"):
        blob = b"".join(s3_corpus.cat_file(f) for f in s3_corpus.find(f"{BUCKET}/sources/{what}"))
        assert blob and secret.encode() not in blob and key.encode() not in blob, what
