"""Data in object storage, against a real S3-compatible server on 127.0.0.1 (moto_server, the session's
`s3_server`, whose endpoint and credentials are in the standard AWS environment of this process and of
the session Ray's workers): shards inspected and trained on from s3://, two named sources, the token cache
written there, the credentials nowhere in what a run records, and a store that stops mid-read."""
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from common import S3Server, mlflow_client, run_config

pytestmark = pytest.mark.slow

BUCKET = "omnistream-test"


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    """The session corpus uploaded to s3://omnistream-test/corpus/."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for p in corpus["train"] + corpus["eval"]:
        fs.put(str(p), f"{BUCKET}/corpus/{Path(p).name}")
    return fs


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


def test_a_run_trains_on_two_sources_in_s3_with_its_token_cache_there_and_no_credential_anywhere(
        trained, s3, corpus, tmp_path, capfd):
    from omnistream.cluster.driver import run_training

    cfg = run_config(corpus, tmp_path, f'data.sources.a.shards=["s3://{BUCKET}/corpus/train-00[01].tar"]',
                     f'data.sources.b.shards=["s3://{BUCKET}/corpus/train-00[23].tar"]', "data.sources.b.weight=0.25",
                     f'data.token_cache="s3://{BUCKET}/cache"', "train.steps=4", "train.zero_stage=0",
                     "cluster.num_workers=1", "data.eval_shards=[]", f'data.bundle_dir="{trained["tmp"]}/bundle"')
    res = run_training(cfg)
    assert res.metrics["data/source/a/seen"] == 240 and res.metrics["data/source/b/seen"] == 240
    assert res.metrics["data/source_tokens/a"] > res.metrics["data/source_tokens/b"] > 0
    for name in ("a", "b"):  # each source's cache, complete: a parquet and its completion record per shard
        files = s3.ls(f"{BUCKET}/cache/{name}/shards")
        assert sum(f.endswith(".parquet") for f in files) == 2 and sum(f.endswith(".json") for f in files) == 2
    # the key, and above all the secret, are nowhere: params, tags, logs, the checkpoint, the cache
    secret, key = S3Server.SECRET, os.environ["AWS_ACCESS_KEY_ID"]
    run = mlflow_client(res.tracking_uri).get_run(res.run_id)
    recorded = json.dumps(run.data.params) + json.dumps(run.data.tags)
    out, err = capfd.readouterr()
    ckpt = b"".join(p.read_bytes() for p in Path(res.checkpoint).rglob("*") if p.is_file())
    cache = b"".join(s3.cat_file(f) for f in s3.find(f"{BUCKET}/cache"))
    for what, text in (("params and tags", recorded), ("logs", out + err)):
        assert secret not in text and key not in text, what
    for what, blob in (("checkpoint", ckpt), ("token cache", cache)):
        assert secret.encode() not in blob and key.encode() not in blob, what


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
