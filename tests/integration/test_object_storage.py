"""Data in object storage, against a real S3-compatible server on 127.0.0.1 (moto_server, the session's
`s3_server`, whose endpoint and credentials are in the standard AWS environment of this process and of
the session Ray's workers): shards inspected from s3://, a store that stops mid-read, a tracking server
keeping artifacts in S3. The training run on two sources in S3, its cache and checkpoints there and the
resume from them: integration/test_sources_run.py."""

import io
import tarfile
from pathlib import Path

import pytest

from common import S3_BUCKET as BUCKET
from common import S3Server, run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(s3_corpus):
    return s3_corpus


def _counts(r: dict) -> tuple:
    return r["seen"], r["kept"], r["filtered"], r["errored"], r["per_modality"]


def test_data_inspect_reads_s3_shards_as_it_reads_the_same_shards_on_disk(ray_local, s3, corpus, tmp_path):
    from omnistream.pipelines.inspect import inspect_shards

    cfg = run_config(corpus, tmp_path)
    remote = inspect_shards([f"s3://{BUCKET}/corpus/train-{{000..003}}.tar"], cfg.data, cfg.modalities, cfg.seed)
    local = inspect_shards([f"{corpus['dir']}/train-*.tar"], cfg.data, cfg.modalities, cfg.seed)
    assert remote["shards"] == 4 and remote["seen"] == 480
    assert _counts(remote) == _counts(local)
    assert all(s.startswith(f"s3://{BUCKET}/corpus/") for s in remote["per_shard"])


def test_a_brace_member_that_is_not_there_is_counted_as_shard_missing(ray_local, s3, corpus, tmp_path):
    """`{000..004}` over four shards: the fifth is not dropped without a word (99 of 100 read, nothing said)
    but listed, errored as shard_missing and counted, on disk and in S3 alike; the others read as before."""
    from omnistream.pipelines.inspect import inspect_shards
    from omnistream.pipelines.shards import list_shards

    cfg = run_config(corpus, tmp_path)
    for spec in (f"{corpus['dir']}/train-{{000..004}}.tar", f"s3://{BUCKET}/corpus/train-{{000..004}}.tar"):
        listed = list_shards([spec])
        assert len(listed) == 5 and listed[-1].endswith("train-004.tar"), listed
        r = inspect_shards([spec], cfg.data, cfg.modalities, cfg.seed)
        assert r["seen"] == 480 and r["shards"] == 5, r
        assert [e["reason"] for e in r["shard_errors"]] == ["shard_missing"], r["shard_errors"]


def test_a_shard_cut_short_by_an_outage_is_read_again_not_cached_as_complete(corpus, bundle, tmp_path, monkeypatch):
    """A shard whose store was down when it was tokenized is written to the token cache marked for a retry:
    `data tokenize` or the next run reads it again (it was taken as complete, and every later run read the
    cut-short shard); read whole, it is complete."""
    import fsspec
    import numpy as np
    import s3fs

    from omnistream.pipelines.cache import TokenCache
    from omnistream.pipelines.tokenize import ShardTokenizer

    cfg = run_config(
        corpus,
        tmp_path,
        f'data.bundle_dir="{bundle}"',
        "data.remote_retries=1",
        "data.dedup.exact=false",
        "data.dedup.near=false",
    )
    cache = TokenCache(str(tmp_path / "cache"))
    shard = "s3://outage/train-000.tar"
    own = S3Server()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    try:
        own.start()
        for k, v in own.env.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        own.stop()  # the store is down when the shard is read
        tok = ShardTokenizer(cfg.modalities, bundle, cfg.data, cfg.seed, cache.url, [])
        out = tok({"shard": np.array([shard], dtype=object)})
        assert out["error"][0] == "", out
        done, todo = cache.status([shard], retry_failed=True)
        assert todo == [shard] and not done, "an outage is not the shard's contents"
        assert cache.status([shard])[0][shard]["tally"]["shard_errors"][0]["reason"] == "shard_read_failed"
        own.start()  # back, with the shard
        s3fs.S3FileSystem.clear_instance_cache()
        fs = fsspec.filesystem("s3")
        fs.mkdir("outage")
        fs.put(corpus["train"][0], shard)
        out = tok({"shard": np.array([shard], dtype=object)})
        assert out["seen"][0] == 120, out
        done, todo = cache.status([shard], retry_failed=True)
        assert not todo and done[shard]["rows"] > 0 and "retry" not in done[shard]
    finally:
        own.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_checkpoint_key_that_escapes_its_folder_is_refused_and_nothing_is_written(
    s3, bundle, corpus, tmp_path, capsys
):
    """Whoever can write to the bucket wrote files on every machine that resumes or exports from it: a key
    `runs/ckpt/../../ESCAPED` landed two levels above the download folder. Now every key must fall inside
    the folder, or the copy is refused, naming the key, before a byte is written; resume and export alike."""
    import glob
    import json
    import tempfile
    import uuid

    import boto3

    from omnistream.cli import main
    from omnistream.cluster.driver import prepare
    from omnistream.common.errors import UserError

    mark = f"ESCAPED-{uuid.uuid4().hex[:8]}"
    s3api = boto3.client("s3")
    base = f"hostile/{uuid.uuid4().hex[:8]}/ckpt"
    s3api.put_object(Bucket=BUCKET, Key=f"{base}/omnistream.json", Body=json.dumps({"step": 1}).encode())
    s3api.put_object(Bucket=BUCKET, Key=f"{base}/../../{mark}.txt", Body=b"planted")
    assert any(mark in k["Key"] for k in s3api.list_objects_v2(Bucket=BUCKET, Prefix="hostile/")["Contents"])
    url = f"s3://{BUCKET}/{base}"

    cfg = run_config(corpus, tmp_path, f'data.bundle_dir="{bundle}"', f'train.resume_from="{url}"')
    with pytest.raises(UserError, match=f"object key .*{mark}.* outside the checkpoint's folder: refused"):
        prepare(cfg)
    assert main(["export", url, str(tmp_path / "out")]) == 2
    assert mark in capsys.readouterr().err
    assert not glob.glob(f"{tempfile.gettempdir()}/**/{mark}*", recursive=True)
    assert not list(tmp_path.rglob(f"{mark}*")) and not (tmp_path / "out").exists()
    assert not Path("/", f"{mark}.txt").exists() and not Path(tempfile.gettempdir(), f"{mark}.txt").exists()


def test_a_folder_uploaded_as_a_converted_checkpoint_holds_no_link(s3, tmp_path):
    """The universal form is converted into a folder and uploaded as the run's weights: a link in it (planted,
    or made by anything) would upload what it points to. Refused, nothing uploaded."""
    from omnistream.cluster.driver import _upload
    from omnistream.common.errors import UserError

    d = tmp_path / "universal"
    (d / "model").mkdir(parents=True)
    (d / "model" / "a.pt").write_bytes(b"weights")
    (d / "model" / "b.pt").symlink_to("/etc/hostname")
    with pytest.raises(UserError, match="b.pt is a link"):
        _upload(d, f"s3://{BUCKET}/uploads/x")
    assert not s3.find(f"{BUCKET}/uploads/x")
    (d / "model" / "b.pt").unlink()
    _upload(d, f"s3://{BUCKET}/uploads/x")
    assert s3.find(f"{BUCKET}/uploads/x") == [f"{BUCKET}/uploads/x/model/a.pt"]


def _big_shard(records: int) -> bytes:
    """A shard of `records` text records of 4 KiB each, written by tarfile."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(records):
            data = (f"record {i} " * 500)[:4096].encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_store_that_stops_mid_read_errors_the_shard_counted_after_its_retries_with_what_came_before_kept(monkeypatch):
    """A server of its own, stopped after the first records of a 12 MB shard were read: the read is resumed
    `retries` times, then the shard is errored as shard_read_failed; the records read whole before are kept."""
    import fsspec
    import s3fs

    from omnistream.pipelines.accounting import Tally
    from omnistream.pipelines.records import read_shard

    own = S3Server()
    own.start()
    try:
        for k, v in own.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries of a refused connection: one try
        s3fs.S3FileSystem.clear_instance_cache()  # clients are cached per options, not per environment
        fs = fsspec.filesystem("s3")
        fs.mkdir("stops")
        n = 3000
        fs.pipe_file("stops/big.tar", _big_shard(n))
        tally, kept = Tally(), 0
        for i, r in enumerate(read_shard("s3://stops/big.tar", 1 << 26, retries=2)):
            if i == 100:
                own.stop()
            if r.key and not r.error:
                kept += 1
            elif not r.key:
                tally.shard_error(r.shard, r.error, r.detail)
        assert 100 <= kept < n
        assert [e["reason"] for e in tally.shard_errors] == ["shard_read_failed"]
        assert "after 2 retries" in tally.shard_errors[0]["detail"]
        assert tally.metrics()["data/shard_errors/shard_read_failed"] == 1
    finally:
        own.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_the_tracking_server_keeps_a_runs_artifacts_in_s3(s3, corpus, tmp_path):
    """`cluster up --artifacts s3://...`: the tracking server writes what runs log there (the clients send it
    over HTTP and need no credentials of their own)."""
    from common import TrackingServer
    from omnistream import tracking

    srv = TrackingServer(tmp_path / "mlflow", artifacts=f"s3://{BUCKET}/mlflow")
    srv.start()
    try:
        cfg = run_config(corpus, tmp_path, f'tracking.uri="{srv.uri}"')
        t = tracking.start_run(cfg.tracking, {"example": 1}, {})
        t.log_text("what a run logged", "notes/hello.txt")
        t.finish("FINISHED")
        stored = [k for k in s3.find(f"{BUCKET}/mlflow") if k.endswith("notes/hello.txt")]
        assert len(stored) == 1 and t.run_id in stored[0]
        assert s3.cat_file(stored[0]) == b"what a run logged"
    finally:
        srv.stop()
