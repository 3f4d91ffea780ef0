"""Data in object storage, against a real S3-compatible server on 127.0.0.1 (moto_server, the session's
`s3_server`, whose endpoint and credentials are in the standard AWS environment of this process and of
the session Ray's workers): shards inspected from s3://, a store that stops mid-read, a tracking server
keeping artifacts in S3. The training run on two sources in S3, its cache and checkpoints there and the
resume from them: integration/test_sources_run.py."""
import io
import tarfile

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


def test_a_store_that_stops_mid_read_errors_the_shard_counted_after_its_retries_with_what_came_before_kept(
        monkeypatch):
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
    from omnistream import tracking

    from common import TrackingServer

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
