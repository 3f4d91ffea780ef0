"""Shared fixtures: a small real demo corpus, a fitted tokenizer bundle, a local Ray cluster.

Tests live by kind: unit/ (no Ray, no subprocess), integration/ (a local Ray, the real Trainer),
system/ (the CLI, a Ray head, plugin install, placement). Helpers are in common/.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# before torch is first imported (libgomp reads it as it loads): this process's and its children's OpenMP
# threads sleep when idle, as connect.worker_env has Ray's workers do. The suite runs two test processes on 2
# cores: a thread that spins waiting takes the core the other half of the suite needs (the learned image
# tokenizer's test beside one busy process: 147 s of wall time spinning, 51 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# tests/hooks/sitecustomize.py, in every process the tests start (Ray's workers too): a stand-in for a
# decoder library that crashes on crafted bytes, for the shard that kills its actor (test_data_quality)
_HOOKS = os.path.join(os.path.dirname(__file__), "hooks")
if _HOOKS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_HOOKS, os.environ.get("PYTHONPATH")) if p)

import threading

import pytest

from common import (
    S3_BUCKET,
    SMALL,
    SMALL_OPTIONS,
    UNINTERRUPTED,
    S3Server,
    TrackingServer,
    fit_modalities,
    non_loopback_listeners,
    run_config,
)
from omnistream.modalities.vocab import Vocabulary
from omnistream.pipelines.democorpus import write_demo_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_demo_corpus(d, SMALL) | {"dir": str(d)}


@pytest.fixture(scope="session")
def fitted(corpus):
    return fit_modalities(corpus["train"], SMALL_OPTIONS)


@pytest.fixture(scope="session")
def bundle(fitted, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    Vocabulary(fitted).save(d)
    return str(d)


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on 127.0.0.1 for the session, its endpoint and credentials in the standard
    AWS environment of this process, and so of the session Ray's workers, which start after it."""
    s = S3Server()
    s.start()
    saved = {k: os.environ.get(k) for k in s.env}
    os.environ.update(s.env)
    yield s
    s.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_corpus(s3_server, corpus):
    """The session corpus uploaded to s3://omnistream-test/corpus/; the bucket's fsspec filesystem."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(S3_BUCKET)
    for p in corpus["train"] + corpus["eval"]:
        fs.put(str(p), f"{S3_BUCKET}/corpus/{os.path.basename(p)}")
    return fs


@pytest.fixture(scope="session")
def ray_local(s3_server):
    from omnistream.cluster.connect import connect

    ray = connect("", num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """One MLflow tracking server for the session, as `cluster up` starts it (127.0.0.1, SQLite, proxied
    artifacts): the shared run logs to it, and the outage tests stop it and start it again."""
    s = TrackingServer(tmp_path_factory.mktemp("tracking"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def trained(ray_local, corpus, tracking_server, tmp_path_factory):
    """The one small run the end-to-end tests read (integration/test_e2e.py, browser/): its tokenizers
    fitted through the CLI's path, then 2 Ray Train workers, ZeRO-3, 10 steps, checkpoints at 3, 6, 9
    and 10, evaluations at 5 and 10, logging to the session's MLflow tracking server. A thread samples
    the listener table while it trains."""
    from omnistream.cluster.driver import run_training
    from omnistream.pipelines.fit import fit_bundle

    tmp = tmp_path_factory.mktemp("e2e")
    # evaluations at steps 5 and 10: samples at two steps, for the image card's step slider
    # [generate.text] max_new_tokens: a default the export keeps, read back by `generate` and the served model
    cfg = run_config(
        corpus,
        tmp,
        *UNINTERRUPTED,
        "train.eval_every=5",
        "generate.text.max_new_tokens=4",
        f'tracking.uri="{tracking_server.uri}"',
    )
    vocab, summary = fit_bundle(cfg.resolved_paths().data, cfg.modalities, cfg.seed)
    assert set(summary["samples"]) == {"text", "image", "audio"}

    seen_bad: list[str] = []
    stop = threading.Event()

    def watch():  # sample the listener table while the cluster trains
        while not stop.is_set():
            seen_bad.extend(non_loopback_listeners())
            stop.wait(1.0)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        res = run_training(cfg)
    finally:
        stop.set()
        th.join()
    return {"cfg": cfg, "res": res, "tmp": tmp, "bad_listeners": sorted(set(seen_bad)), "server": tracking_server}


@pytest.fixture(scope="module")
def own_ray_only():
    """For tests that start Ray processes of their own (a head, a simulated cluster, CLI runs): end this
    process's local Ray first, so two Rays do not share the machine's 2 cores. `connect()` starts it
    again for a later test that needs it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


# `make test` runs the suite in 2 processes (pytest-xdist, `-n 2`) with this scheduler: a module's tests
# stay in one process, so its module fixtures (a training run, a Ray head, the plugin guide's run) are
# made once, and the modules on the session's Ray (`ray_local`, and `trained`, the shared run on it) all
# in one, so there is one session Ray and one shared run. (xdist's own `loadgroup` markers do not group
# under pytest 9: its worker's hook renames test ids, which pytest 9 no longer lets it do.) A module
# that starts using `ray_local` belongs here: elsewhere it would start a second session Ray.
SESSION_RAY_MODULES = {
    "tests/browser/test_mlflow_ui.py",
    "tests/integration/test_e2e.py",
    "tests/integration/test_data_quality.py",
    "tests/integration/test_hostile_run.py",
    "tests/integration/test_local_ray_auth.py",
    "tests/integration/test_sources_run.py",
    "tests/integration/test_object_storage.py",
    "tests/integration/test_own_data_ray.py",
}


# the modules that start Ray heads of their own (`cluster up`) run one after the other: two heads starting
# at once on 2 cores beside the session's run left one's job agent unregistered for 90 s (submit: "No
# available agent") in a fresh-clone run
HEAD_MODULES = {"tests/system/test_jobs.py", "tests/system/test_cluster_up.py"}


# Seconds of the longest scopes, as measured in a full run on 2 cores: the scheduler hands them out first,
# longest first (xdist's own order is by number of tests, which leaves a 2-minute module of one test to
# the end, when the other process may have run out of work)
LONG_SCOPES = {
    "session-ray": 650,
    "tests/system/test_scale.py": 300,
    "heads": 175,
    "tests/system/test_plugin.py": 110,
    "tests/system/test_cli.py": 100,
    "tests/integration/test_golden.py": 90,
    "tests/integration/test_learned_tokenizer.py": 55,
}


def _scope(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    if module in HEAD_MODULES:
        return "heads"
    return "session-ray" if module in SESSION_RAY_MODULES else module


def pytest_collection_modifyitems(config, items):
    """The longest scopes' tests first (a stable sort: each module's own order is kept)."""
    items.sort(key=lambda item: -LONG_SCOPES.get(_scope(item.nodeid), 0))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    config.option.loadscopereorder = False  # the collection's order: the longest scopes first (above)
    return ByModule(config, log)
