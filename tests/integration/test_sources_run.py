"""Two named sources on a weight schedule, one of Parquet files and one of folders of media files (the
corpus's tar records converted, tests/common), kept in object storage, through the real stream (token caches,
Ray Data, the Interleave actor) and the real Trainer on the session's Ray, against the session's S3 server
on 127.0.0.1 (tests/conftest.py `s3_server`): shards, token caches and Ray Train's checkpoints all in S3.
The schedule is followed, each source is accounted under its name, a resume from an S3 checkpoint made before
the switch, on another number of workers and across the switch, consumes the uninterrupted run's rows (same
ledger digest) and re-reads at most one packing window, the resumed run is recorded by the TensorBoard backend
and read back by TensorBoard's own reader, and the store's key and secret are in nothing the runs record. (A
resume after a switch, and 8 -> 3 -> 8 ranks across one: tests/system/test_scale.py.)"""

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
    N-1 on 2 workers (DeepSpeed's universal form, converted and kept in S3), recorded with TensorBoard."""
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
        # recorded with the TensorBoard backend: the same driver and ranks, another store behind the Tracker door
        resumed = run_training(
            cfg(
                "cluster.num_workers=2",
                f'train.resume_from="{steps[N - 1]}"',
                'tracking.backend="tensorboard"',
                f'tracking.uri="{tmp / "tensorboard"}"',
            )
        )
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
        "tensorboard": tmp / "tensorboard",
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
    for k in ("data/consumed_records", "data/consumed_rows"):
        assert res.metrics[k] == whole.metrics[k], k


def test_the_resume_replays_at_most_one_window_reads_the_cache_and_goes_on_from_the_trained_weights(runs, s3_corpus):
    """The step-4 checkpoint of 1 worker resumed on 2: steps 5..10 again; the stream re-read before going on
    is at most one packing window's documents, not the run so far (the rehearsal, tests/system/test_scale.py,
    resumes at steps 2 or 4, 6 and 10 with the same bound); every shard's tokens come from the token cache;
    the loss goes on from where the uninterrupted run had it."""
    whole, res = runs["whole"], runs["resumed"]
    at = {k: dict(res.tracker.metric_history(k)) for k in ("data/resume/replayed_records", "data/resume/seconds")}
    assert sorted(at["data/resume/seconds"]) == [N] and at["data/resume/seconds"][N] > 0  # logged with step N
    steps = {s for s, _ in res.tracker.metric_history("train/loss")}
    assert steps == set(range(N, 11))
    # documents per packing window, as the uninterrupted run planned it (one window of each source's)
    window = sum(json.loads(s3_corpus.cat_file(f"{whole.checkpoint[len('s3://') :]}/data.json"))["stream"]["window"])
    assert 0 < at["data/resume/replayed_records"][N] <= window
    assert res.metrics["data/resume/replayed_rows"] > 0
    for name in ("a", "b"):
        assert res.metrics[f"data/cache/{name}/shards_reused"] == 2 and not res.metrics.get(
            f"data/cache/{name}/shards_tokenized"
        ), name
    # on another number of workers the float sums come in another order
    a, b = dict(whole.tracker.metric_history("train/loss")), dict(res.tracker.metric_history("train/loss"))
    assert abs(a[N] - b[N]) < 0.01 * a[N] and abs(a[10] - b[10]) < 0.01 * a[10]


def test_a_run_tracked_by_tensorboard_is_read_back_by_tensorboards_own_reader(runs):
    """tracking.backend = "tensorboard" (the resumed run): its folder holds event files (the driver's and rank
    0's) that TensorBoard's reader reads with every per-modality loss curve, the data accounting and the tags,
    and the files an MLflow run has as artifacts; no MLflow run was made for it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole, res = runs["whole"], runs["resumed"]
    assert res.tracking_uri == str(runs["tensorboard"])
    (run_dir,) = [d for d in (runs["tensorboard"] / "omnistream").iterdir() if d.name.endswith(res.run_id[:8])]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) >= 2, "the driver's and rank 0's event files"
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0}, purge_orphaned_data=False).Reload()
    for m in ("text", "image", "audio"):
        assert sorted({e.step for e in acc.Scalars(f"train/loss/{m}")}) == list(range(N, 11)), m
    seen = whole.metrics["data/seen"]
    assert acc.Scalars("data/seen")[-1].value == seen
    assert acc.Scalars("data/source_tokens/a")[-1].value == _tokens(whole, "a")[10]
    tags = {
        t: acc.Tensors(t)[-1].tensor_proto.string_val[0].decode()
        for t in acc.Tags()["tensors"]
        if t.startswith("tags/")
    }
    assert tags["tags/data.ledger_digest"] == whole.ledger_digest
    assert tags["tags/omnistream.status"] == "FINISHED"
    assert (run_dir / "artifacts" / "config" / "resolved.toml").read_text().count('backend = "tensorboard"') == 1
    assert json.loads((run_dir / "artifacts" / "data" / "report.json").read_text())["seen"] == seen
    c = mlflow_client(whole.tracking_uri)
    made = c.search_runs([c.get_experiment_by_name("omnistream").experiment_id])
    assert res.run_id not in {r.info.run_id for r in made}


def test_the_stores_key_and_secret_are_in_no_param_tag_log_checkpoint_or_cache(runs, s3_corpus):
    secret, key = S3Server.SECRET, os.environ["AWS_ACCESS_KEY_ID"]
    run = mlflow_client(runs["whole"].tracking_uri).get_run(runs["whole"].run_id)
    recorded = json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert secret not in recorded and key not in recorded
    # the resumed run's TensorBoard folder: its event files (params, tags, metrics) and artifacts
    tb = b"".join(p.read_bytes() for p in runs["tensorboard"].rglob("*") if p.is_file())
    assert tb and secret.encode() not in tb and key.encode() not in tb
    assert runs["driver_log"] and secret not in runs["driver_log"] and key not in runs["driver_log"]
    assert runs["ray_logs"] and not any(secret.encode() in b or key.encode() in b for b in runs["ray_logs"])
    for what in ("ray", "cache"):
        blob = b"".join(s3_corpus.cat_file(f) for f in s3_corpus.find(f"{BUCKET}/sources/{what}"))
        assert blob and secret.encode() not in blob and key.encode() not in blob, what
