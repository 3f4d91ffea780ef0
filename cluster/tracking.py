"""Tracking: the `Tracker` interface the Trainer logs through, and MLflow behind it.

The driver creates the MLflow run and logs params and the resolved config; rank 0 of
the training workers logs metrics into the same run by id (a restarted worker
group keeps logging into it, so the step axis continues). Metric names are the
contract of docs/architecture.md ("MLflow names").
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

MAX_PARAM = 6000  # MLflow's limit on one param value


def client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_file(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


class Tracker(Protocol):
    """What the Trainer needs of a tracker (levanter's `tracker/` has the same shape)."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MemoryTracker:
    """Keeps everything in memory: for runs outside MLflow (the golden test, the GPU check)."""

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.artifacts: dict[str, bytes] = {}
        self.tags: dict[str, str] = {}
        self.status: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if v is not None:
                self.history.setdefault(k, []).append((step, float(v)))

    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None:
        self.artifacts[f"{artifact_path}/{name}"] = data

    def set_tag(self, key: str, value: str) -> None:
        self.tags[key] = value

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status

    def last(self) -> dict[str, float]:
        return {k: v[-1][1] for k, v in self.history.items()}


class MLflowTracker:
    """The MLflow Tracker: batches metrics (one log_batch per call, not one request per number)."""

    def __init__(self, uri: str, run_id: str):
        self.c = client(uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.c.log_batch(self.run_id, metrics=items[i:i + 500])

    def set_tag(self, key: str, value: str) -> None:
        self.c.set_tag(self.run_id, key, value)

    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_bytes(data)
            self.c.log_artifact(self.run_id, str(p), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.c.set_terminated(self.run_id, status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def final_metrics(uri: str, run_id: str) -> dict[str, float]:
    return dict(client(uri).get_run(run_id).data.metrics)


def ui_command(uri: str, run_id: str) -> str:
    if uri.startswith("http"):
        return f"open {uri.rstrip('/')}/#/experiments/0/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
