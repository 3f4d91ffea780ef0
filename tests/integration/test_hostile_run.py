"""A training run survives what issue 12 throws at it: hostile shards (the planted corpus), and a
tracking server that goes away, which never costs it its metrics: a real MLflow server on 127.0.0.1
(SQLite behind it), stopped while rank 0 logs and started again on the same port and store."""

import json
import threading
import time

import pytest

from common import mlflow_client, mlflow_run, run_config


def _said(logger: str) -> list[str]:
    """What `logger` says from now on, line by line (omnistream's loggers do not propagate to pytest's)."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger(logger).addHandler(Keep())
    return lines


@pytest.fixture
def server(tracking_server):
    """The session's tracking server (conftest), stopped and started again by these tests; running again
    after each, whatever the test did."""
    yield tracking_server
    if tracking_server.srv is None:
        tracking_server.start()


def test_what_overflows_the_buffer_is_counted_and_the_rest_sent(server, monkeypatch):
    """Server down: 3000 values into a buffer of 1000; the oldest 2000 are dropped and counted, and the
    1000 held are all sent once the server is back."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from omnistream import tracking
    from omnistream.configs import TrackingConfig

    run_id = tracking.start_run(TrackingConfig(uri=server.uri, experiment="outage", run_name="buffer"), {}, {}).run_id
    server.stop()
    said = _said("omnistream.tracking.buffered")
    t = tracking.BufferedTracker(tracking.attach(TrackingConfig(uri=server.uri), run_id), max_metrics=1000)
    for step in range(1, 31):
        t.log({f"m/{i:03d}": float(step) for i in range(100)}, step)
    assert t.dropped == 2000
    server.start()
    assert t.close(timeout=120), said
    got = mlflow_run(server.uri, run_id).metric_history("m/007")
    assert [s for s, _ in got] == list(range(21, 31))
    assert mlflow_run(server.uri, run_id).final_metrics()["tracking/dropped_metrics"] == 2000
    assert any("failed" in line for line in said) and any("is back" in line for line in said), said


@pytest.mark.slow
def test_a_run_survives_hostile_shards_and_its_tracking_server_going_away(ray_local, server, corpus, bundle, tmp_path):
    """One run meets all of issue 12 at once. Its shards are the planted corpus (every defect, the #12
    hostile shards, and one whose bytes kill the actor reading it), tokenized into the token cache on its
    way. Its tracking server is stopped once the run exists in it (the driver has logged its step-0
    figures) and started again only when training has written its last checkpoint: every step is
    trained while it is gone, none waits for it, the run finishes, every record is accounted under its
    reason, and every step's metrics are in the store afterwards."""
    from test_data_quality import write_planted

    from omnistream.cluster.driver import run_training

    shards, _ = write_planted(tmp_path / "planted")
    steps, storage = 10, tmp_path / "ray"
    cfg = run_config(
        corpus,
        tmp_path,
        f"train.steps={steps}",
        "data.epochs=3",
        "cluster.num_workers=1",
        "data.eval_shards=[]",
        f"data.train_shards={json.dumps(shards + corpus['train'][:1])}",
        f'data.bundle_dir="{bundle}"',
        f'tracking.uri="{server.uri}"',
        'tracking.experiment="outage"',
        f'cluster.storage_path="{storage}"',
    )
    outage: dict[str, float] = {}

    def cut():
        c = mlflow_client(server.uri)
        while time.time() < deadline:
            exp = c.get_experiment_by_name("outage")
            runs = c.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'demo'") if exp else []
            if any("data/cache/shards_reused" in r.data.metrics for r in runs):
                break
            time.sleep(0.2)
        server.stop()
        outage["stopped"] = time.time()
        while time.time() < deadline and not any(storage.glob("*/checkpoint_*/omnistream.json")):
            time.sleep(0.2)
        time.sleep(2)
        outage["restarting"] = time.time()
        server.start()

    deadline = time.time() + 600
    th = threading.Thread(target=cut, daemon=True)
    th.start()
    res = run_training(cfg)
    th.join()

    # the hostile shards: each record under its reason, the killing shard one shard error
    assert res.data_report["balanced"]
    for reason in ("image_undecodable", "too_many_members", "audio_sample_rate", "header_too_large"):
        assert res.metrics[f"data/errored/{reason}"] >= 1, reason
    assert "data/filtered/duplicate" in res.metrics
    assert res.metrics["data/shard_errors/actor_died"] == 1

    # the outage
    assert "restarting" in outage, "the server was never stopped and started again"
    assert mlflow_client(server.uri).get_run(res.run_id).info.status == "FINISHED"
    hist = mlflow_client(server.uri).get_metric_history(res.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, steps + 1)), [m.step for m in hist]
    # each step was trained (and stamped) while the server was gone, held, and sent once it was back
    assert all(outage["stopped"] * 1000 < m.timestamp < outage["restarting"] * 1000 for m in hist), (
        outage,
        [(m.step, m.timestamp) for m in hist],
    )
    for key in ("train/tokens_per_s", "train/loss/text", "data/tokens/audio"):
        assert len(mlflow_run(server.uri, res.run_id).metric_history(key)) == steps, key
