"""The MLflow backend (the default): runs in an MLflow tracking store, SQLite or a tracking server.

The driver starts the run and logs params and the resolved config; rank 0 of the training workers
attaches to the same run by id and logs metrics into it (a restarted worker group keeps logging into
it, so the step axis continues). Metric names are the contract of docs/architecture.md ("MLflow names").
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

log = logging.getLogger(__name__)

MAX_PARAM = 6000  # MLflow's limit on one param value
# MLflow 3 opens an experiment without this tag in its GenAI view (traces, judges); this one is model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    from .server import load_job_credentials

    load_job_credentials()  # in a submitted job, the tracking server's user and password (see there)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


class MLflowTracker:
    """One MLflow run. Metrics are batched (one log_batch per call, not one request per number)."""

    backend = "mlflow"

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.c = client(uri)

    # ---- the backend ---------------------------------------------------------------------------------
    @classmethod
    def resolve_uri(cls, uri: str) -> str:
        """'' is SQLite in the working directory (mlflow.db), made absolute so every process finds it."""
        if not uri:
            return f"sqlite:///{os.path.abspath('mlflow.db')}"
        if "://" not in uri:  # a bare folder: MLflow's file store
            return os.path.abspath(uri)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # sqlite:///runs/x.db is relative to the working directory, which a Ray worker does not share:
            # rank 0 would log into another (new, empty) database than the driver's
            return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
        return uri

    @classmethod
    def registry_uri(cls, uri: str) -> str:
        """MLflow's model registry lives in the tracking store itself."""
        return cls.resolve_uri(uri)

    @classmethod
    def start(cls, settings, params: dict[str, Any], tags: dict[str, str], description: str = "") -> MLflowTracker:
        """A new run in `settings.experiment` (created, or tagged, as a model-training experiment), with the
        params (dotted names, so MLflow groups them by section) and a description (`mlflow.note.content`)."""
        uri = cls.resolve_uri(settings.uri)
        c = client(uri)
        exp = c.get_experiment_by_name(settings.experiment)
        if exp is None:
            exp_id = c.create_experiment(settings.experiment, tags=EXPERIMENT_KIND)
        else:
            exp_id = exp.experiment_id
            for k, v in EXPERIMENT_KIND.items():
                if exp.tags.get(k) != v:
                    c.set_experiment_tag(exp_id, k, v)
        if description:
            tags = {**tags, "mlflow.note.content": description}
        run = c.create_run(exp_id, run_name=settings.run_name or None, tags=tags)
        t = cls(uri, run.info.run_id)
        t.log_params(params)
        return t

    @classmethod
    def attach(cls, settings, run_id: str) -> MLflowTracker:
        return cls(cls.resolve_uri(settings.uri), run_id)

    # ---- writing -------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """`metrics` at `step`, stamped with the time they were measured (ms), not the time they are sent."""
        from mlflow.entities import Metric

        ts = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.c.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.c.log_batch(self.run_id, params=items[i : i + 100])

    def set_tag(self, key: str, value: str) -> None:
        self.c.set_tag(self.run_id, key, value)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.c.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_bytes(data)
            self.c.log_artifact(self.run_id, str(p), artifact_path)

    def log_image(self, key: str, png: bytes, step: int) -> None:
        """An image with a step: MLflow's image grid shows each key's images over the steps."""
        import io

        from PIL import Image

        self.c.log_image(self.run_id, Image.open(io.BytesIO(png)), key=key, step=step)

    def log_table(self, rows: dict[str, list], artifact_file: str) -> None:
        self.c.log_table(self.run_id, data=rows, artifact_file=artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.c.set_terminated(self.run_id, status)

    def flush(self) -> None:
        pass  # every call above has reached the store when it returns

    # ---- reading back --------------------------------------------------------------------------------
    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) in step order (MLflow returns them in the order they were stored)."""
        found = sorted(self.c.get_metric_history(self.run_id, key), key=lambda m: (m.step, m.timestamp))
        return [(m.step, m.value) for m in found]

    def final_metrics(self) -> dict[str, float]:
        return dict(self.c.get_run(self.run_id).data.metrics)

    def tags(self) -> dict[str, str]:
        return dict(self.c.get_run(self.run_id).data.tags)

    def url(self, ui: str = "") -> str:
        """The run's page on a tracking server (self.uri), or on the MLflow UI at `ui` serving this store."""
        exp = self.c.get_run(self.run_id).info.experiment_id
        # MLflow 3's UI picks its view from this parameter (else from the browser's last choice, GenAI at first)
        return f"{(ui or self.uri).rstrip('/')}/#/experiments/{exp}/runs/{self.run_id}?workflowType=machine_learning"

    def link(self) -> str:
        """How a person opens this run: its page on the server, or the `mlflow ui` command for a local store."""
        if self.uri.startswith("http"):
            return f"open {self.url()}"
        return (
            f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1 --port 5000   "
            f"# then open {self.url('http://127.0.0.1:5000')}"
        )

    # ---- system metrics ------------------------------------------------------------------------------
    def start_system_metrics(self, node_id: str, interval: float):
        """MLflow's system metrics monitor for this node (CPU, memory, disk, network, and GPU where there
        is one), logged as system/<node_id>/<metric> into the run from a thread of its own. Returns a
        callable that stops it, or None if it cannot start (a warning: the run goes on without them)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )

            m = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=interval,
                samples_before_logging=1,
                node_id=node_id,
                tracking_uri=self.uri,
            )
            m.start()
        except Exception as e:  # noqa: BLE001 - optional figures; never a reason to stop training
            log.warning("no system metrics on node %s (%s: %s)", node_id, type(e).__name__, e)
            return None
        return lambda: _stop_system_metrics(m)


def _stop_system_metrics(monitor) -> None:
    """Stop the monitor, and log the samples of its last, unfinished interval: MLflow's monitor collects a
    sample, waits the interval, and only then logs it, so on stop it drops what the last interval
    collected (everything, for a run shorter than one interval, whose System metrics tab stays empty)."""
    try:
        monitor.finish()
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - optional figures, as at the start
        log.warning("the last system metrics were not logged (%s: %s)", type(e).__name__, e)
