"""Tracking: one door for everything a run records (docs/architecture.md, "MLflow names").

    from omnistream import tracking

    run = tracking.start_run(cfg.tracking, params, tags, description)   # the driver: a new run
    run = tracking.attach(cfg.tracking, run_id)                           # rank 0, a resumed run
    run.log({"train/loss": 2.1}, step=10); run.log_text(toml, "config/resolved.toml"); run.finish()

`cfg.tracking.backend` picks the backend from the `omnistream.trackers` entry-point group: "mlflow"
(the default; mlflow_backend.py) and "tensorboard" (tensorboard_backend.py) ship with omnistream, and a
package of its own can add another. `BufferedTracker` wraps any of them so that the store never
stops or slows training. server.py runs the MLflow tracking server a head offers its jobs.
"""

from .base import (
    BACKENDS,
    GROUP,
    MemoryTracker,
    Tracker,
    attach,
    backend,
    backend_options,
    backends,
    dumps,
    registry_uri,
    resolve_uri,
    start_run,
)
from .buffered import BufferedTracker

__all__ = [
    "BACKENDS",
    "GROUP",
    "BufferedTracker",
    "MemoryTracker",
    "Tracker",
    "attach",
    "backend",
    "backend_options",
    "backends",
    "dumps",
    "registry_uri",
    "resolve_uri",
    "start_run",
]
