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


# MLflow 3 opens an experiment without this tag in its GenAI view (traces, judges); this one is model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
              description: str = "") -> str:
    """A new run in `experiment` (created, or tagged, as a model-training experiment), with the config's
    params (dotted names, so MLflow groups them by section) and a description (`mlflow.note.content`)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = c.create_experiment(experiment, tags=EXPERIMENT_KIND)
    else:
        exp_id = exp.experiment_id
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) != v:
                c.set_experiment_tag(exp_id, k, v)
    if description:
        tags = {**tags, "mlflow.note.content": description}
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
    def log_image(self, key: str, png: bytes, step: int) -> None: ...
    def log_table(self, rows: dict[str, list], artifact_file: str) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MemoryTracker:
    """Keeps everything in memory: for runs outside MLflow (the golden test, the GPU check)."""

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.artifacts: dict[str, bytes] = {}
        self.images: dict[str, list[tuple[int, bytes]]] = {}
        self.tables: dict[str, dict[str, list]] = {}
        self.tags: dict[str, str] = {}
        self.status: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if v is not None:
                self.history.setdefault(k, []).append((step, float(v)))

    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None:
        self.artifacts[f"{artifact_path}/{name}"] = data

    def log_image(self, key: str, png: bytes, step: int) -> None:
        self.images.setdefault(key, []).append((step, png))

    def log_table(self, rows: dict[str, list], artifact_file: str) -> None:
        self.tables[artifact_file] = rows

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
        self.log_at({k: float(v) for k, v in metrics.items() if v is not None}, step, int(time.time() * 1000))

    def log_at(self, metrics: dict[str, float], step: int, ts: int) -> None:
        """`metrics` at `step`, stamped with the time they were measured (ms), not the time they are sent."""
        from mlflow.entities import Metric

        items = [Metric(k, v, ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.c.log_batch(self.run_id, metrics=items[i:i + 500])

    def set_tag(self, key: str, value: str) -> None:
        self.c.set_tag(self.run_id, key, value)

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


class BufferedTracker:
    """A Tracker that never stops or slows training for the tracking server (rank 0 logs through it).

    Calls return at once: they queue, and one background thread sends them in order. When the server
    is unreachable or fails, the thread warns once, keeps what is queued, retries with backoff (1 s
    doubling to 15 s), and when the server answers again sends it all and says how long it was gone.
    The queue holds up to `max_metrics` metric values (and `max_artifact_bytes` of samples); beyond
    that the oldest metrics are dropped and counted, logged as `tracking/dropped_metrics` once the
    server is back. `close()` waits up to `flush_timeout` seconds for the queue to empty.

    Written here rather than with MLflow's asynchronous logging (log_batch(synchronous=False)): that
    queue drops a batch whose request fails instead of holding it through an outage.
    """

    def __init__(self, inner, max_metrics: int = 100_000, max_artifact_bytes: int = 256 << 20, log=print):
        import collections
        import threading

        self.inner, self.max_metrics, self.max_artifact_bytes, self.say = inner, max_metrics, max_artifact_bytes, log
        self.queue: collections.deque = collections.deque()  # (kind, payload, size)
        self.cond = threading.Condition()
        self.metrics_held = self.artifact_bytes_held = 0
        self.dropped = self.dropped_reported = 0
        self.closing, self.last_step = False, 0
        self.down_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="omnistream-tracking", daemon=True)
        self.thread.start()

    # ---- the Tracker interface: queue and return -----------------------------------------------------
    def log(self, metrics: dict[str, float], step: int) -> None:
        items = {k: float(v) for k, v in metrics.items() if v is not None}
        self.last_step = step
        self._put("metrics", (items, step, int(time.time() * 1000)), len(items))

    def set_tag(self, key: str, value: str) -> None:
        self._put("tag", (key, value), 0)

    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None:
        if self._hold(len(data), f"sample {artifact_path}/{name}"):
            self._put("artifact", (data, name, artifact_path), 0)

    def log_image(self, key: str, png: bytes, step: int) -> None:
        if self._hold(len(png), f"image {key} of step {step}"):
            self._put("image", (key, png, step), 0)

    def log_table(self, rows: dict[str, list], artifact_file: str) -> None:
        self._put("table", (rows, artifact_file), 0)

    def finish(self, status: str = "FINISHED") -> None:
        self._put("finish", status, 0)

    def _hold(self, n: int, what: str) -> bool:
        with self.cond:
            if self.artifact_bytes_held + n > self.max_artifact_bytes:
                self.say(f"[omnistream] warning: tracking server unreachable; {what} not kept "
                         f"(over {self.max_artifact_bytes >> 20} MiB of samples queued)")
                return False
            self.artifact_bytes_held += n
            return True

    def _put(self, kind: str, payload, n: int) -> None:
        with self.cond:
            self.queue.append((kind, payload, n))
            self.metrics_held += n
            while self.metrics_held > self.max_metrics:  # drop the oldest metrics, counted
                i = next((j for j, op in enumerate(self.queue) if op[0] == "metrics"), None)
                if i is None:
                    break
                _, _, k = self.queue[i]
                del self.queue[i]
                self.metrics_held -= k
                self.dropped += k
            self.cond.notify()

    # ---- the sender --------------------------------------------------------------------------------
    def _send(self, kind: str, payload) -> None:
        if kind == "metrics":
            items, step, ts = payload
            self.inner.log_at(items, step, ts)
        elif kind == "tag":
            self.inner.set_tag(*payload)
        elif kind == "artifact":
            self.inner.log_artifact(*payload)
        elif kind == "image":
            self.inner.log_image(*payload)
        elif kind == "table":
            self.inner.log_table(*payload)
        elif kind == "finish":
            self.inner.finish(payload)

    def _run(self) -> None:
        wait = 1.0
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                kind, payload, n = self.queue[0]
            try:
                self._send(kind, payload)
            except Exception as e:  # noqa: BLE001 - any failure of the server or the way to it: hold and retry
                if self.down_since is None:
                    self.down_since = time.time()
                    self.say(f"[omnistream] warning: the tracking server failed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}); training goes on, metrics are held "
                             f"(up to {self.max_metrics}) and sent when it is back")
                with self.cond:
                    self.cond.wait(wait)
                wait = min(wait * 2, 15.0)
                continue
            with self.cond:
                if self.queue and self.queue[0][1] is payload:
                    self.queue.popleft()
                    self.metrics_held -= n
                    if kind in ("artifact", "image"):
                        self.artifact_bytes_held -= len(payload[0] if kind == "artifact" else payload[1])
                self.cond.notify_all()
            wait = 1.0
            if self.down_since is not None:
                gone, self.down_since = time.time() - self.down_since, None
                self.say(f"[omnistream] the tracking server is back after {gone:.0f} s; sending what was held")
            if self.dropped > self.dropped_reported:
                self.dropped_reported = self.dropped
                self._put("metrics", ({"tracking/dropped_metrics": float(self.dropped)}, self.last_step,
                                      int(time.time() * 1000)), 1)

    def close(self, timeout: float = 120.0) -> bool:
        """Send what is queued, waiting up to `timeout` s; False (with a warning saying what) if not all went."""
        deadline = time.time() + timeout
        with self.cond:
            while self.queue and time.time() < deadline:
                self.cond.wait(min(1.0, max(0.0, deadline - time.time())))
            left, held, self.closing = len(self.queue), self.metrics_held, True
            self.cond.notify_all()
        if left:
            self.say(f"[omnistream] warning: the tracking server did not take {left} queued calls ({held} metric "
                     f"values) within {timeout:.0f} s; they are lost")
        if self.dropped:
            self.say(f"[omnistream] warning: {self.dropped} metric values were dropped while the tracking server "
                     f"was unreachable (over tracking.buffer_metrics)")
        return not left


def start_system_metrics(uri: str, run_id: str, interval: float, node_id: str, log=print):
    """MLflow's system metrics monitor for this node (CPU, memory, disk, network, and GPU where there is
    one), logged as system/<node_id>/<metric> into the run from a thread of its own; None if it cannot
    start (a warning: the run goes on without them)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        m = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1, node_id=node_id,
                                 tracking_uri=uri)
        m.start()
        return m
    except Exception as e:  # noqa: BLE001 - optional figures; never a reason to stop training
        log(f"[omnistream] warning: no system metrics on node {node_id} ({type(e).__name__}: {e})")
        return None


def stop_system_metrics(monitor, log=print) -> None:
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
        log(f"[omnistream] warning: the last system metrics were not logged ({type(e).__name__}: {e})")


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def final_metrics(uri: str, run_id: str) -> dict[str, float]:
    return dict(client(uri).get_run(run_id).data.metrics)


def run_url(uri: str, run_id: str, ui: str = "") -> str:
    """The run's page on a tracking server (`uri`), or on the MLflow UI at `ui` serving that store."""
    exp = client(uri).get_run(run_id).info.experiment_id
    # MLflow 3's UI picks its view from this parameter (else from the browser's last choice, GenAI at first)
    return f"{(ui or uri).rstrip('/')}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


def ui_command(uri: str, run_id: str) -> str:
    if uri.startswith("http"):
        return f"open {run_url(uri, run_id)}"
    return (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   "
            f"# then open {run_url(uri, run_id, 'http://127.0.0.1:5000')}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
