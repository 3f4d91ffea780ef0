"""Planning a run over 20,000 remote shards costs requests that grow with listing pages, not with shards.

An S3-compatible server (moto's, in this process, on 127.0.0.1) holds 20,000 shard objects and a token cache
of all of them as a finished build leaves it (a completion record and tokens per shard, and the index of
records). Every request the server answers is counted (werkzeug's request log). The plan of a run over them
(list the shards, key and claim the cache, read what it holds, account, cut the stream into windows) must
cost at most 100 requests plus one per 1,000 shards (README, "Planning at a million shards")."""

from __future__ import annotations

import json
import logging
import os

import pytest

from omnistream.cluster.connect import free_port

N = 20_000
BUCKET = "omnistream-plan"


class _Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def store():
    """The server, with its store seeded directly (20,000 PUTs over HTTP take 77 s on 2 cores; the counted
    requests are the plan's, over HTTP); the standard AWS environment of this process pointed at it."""
    import s3fs
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=True)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "plan-key",
        "AWS_SECRET_ACCESS_KEY": "plan-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made for the session's server points elsewhere
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    count = _Count()
    log = logging.getLogger("werkzeug")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(count)
    yield backend, count
    log.removeHandler(count)
    log.setLevel(level)
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_planning_20000_remote_shards_costs_listing_pages_not_requests_per_shard(store, bundle, tmp_path):
    import s3fs

    from omnistream.modalities.vocab import Vocabulary
    from omnistream.pipelines.accounting import Tally
    from omnistream.pipelines.cache import TokenCache
    from omnistream.pipelines.config import DataConfig
    from omnistream.pipelines.plan import fill_caches, open_sources, plan_stream

    backend, count = store
    for i in range(N):
        backend.put_object(BUCKET, f"corpus/shard-{i:05d}.tar", b"\0" * 1024)
    specs = [f"s3://{BUCKET}/corpus/shard-{{00000..{N - 1:05d}}}.tar"]
    cfg = DataConfig(train_shards=specs, token_cache=f"s3://{BUCKET}/cache", bundle_dir=bundle, seq_len=64)
    vocab = Vocabulary.load(bundle)

    # the cache as a finished build leaves it: one shard's tokens and completion record written by the cache
    # itself, the same for every shard (seeded), and the index of all their records (what the build writes)
    (source,) = open_sources(cfg, vocab.fingerprint, 0)
    tally = Tally()
    tally.seen, tally.kept = 3, 3
    ids = [("text", [1, 2, 3])]
    one = source.cache.write_shard(source.shards[0], vocab.names, ["a", "b", "c"], [(True, ids)] * 3, None, tally, 0.1)
    parquet = source.cache.fs.cat_file(f"{BUCKET}/cache/shards/{TokenCache.shard_id(source.shards[0])}.parquet")
    metas = {}
    for s in source.shards:
        sid = TokenCache.shard_id(s)
        metas[s] = {**one, "shard": s}
        backend.put_object(BUCKET, f"cache/shards/{sid}.parquet", parquet)
        backend.put_object(BUCKET, f"cache/shards/{sid}.json", json.dumps(metas[s]).encode())
    source.cache.write_index(metas)
    s3fs.S3FileSystem.clear_instance_cache()  # no listing remembered from the set-up: the plan pays for its own

    before = len(count.lines)
    sources = open_sources(cfg, vocab.fingerprint, 0)
    fill_caches(sources, {}, 0)  # nothing to tokenize: the records are read and accounted
    plan = plan_stream(cfg, sources, 0, steps=10, rows_per_step=4, micro_batch_size=2)
    made = count.lines[before:]
    print(f"planning {N} shards: {len(made)} requests")
    assert len(sources[0].shards) == N and sources[0].built["already_cached"] == N
    assert plan.tally.seen == 3 * N and len(plan.plan) == N  # every shard planned, its records accounted
    budget = 100 + N // 1000
    lists = sum("list-type=2" in line for line in made)
    assert len(made) <= budget, f"{len(made)} requests > {budget}: " + "\n".join(made[:20])
    assert lists >= N // 1000  # the listing pages (1,000 keys each) are most of it
    # the same plan before: a request per shard for the listing, a HEAD for the key, two reads for the status
    assert len(made) < N / 100
