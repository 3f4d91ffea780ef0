"""`check_tracker`: a tracking backend tested in one call, the way `check_modality` tests a modality.

    from omnistream.tracking.conformance import check_tracker
    check_tracker("mybackend", uri=str(tmp_path))   # in the backend package's own tests

It starts a run through the registry (`tracking.backend`), writes through every method of the `Tracker`
protocol, attaches to the same run by id as a second process would (rank 0, a resumed run), and reads
back what the driver, the CLI's summary and the tests read: metric history in step order, the final
metrics, tags (the last value set wins), and a link. Raises ConformanceError naming the check.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from omnistream.common.errors import ConformanceError

from .base import Tracker, attach, backend, start_run


@dataclass
class _Settings:
    backend: str
    uri: str
    experiment: str = "omnistream-conformance"
    run_name: str = "conformance"
    options: dict[str, Any] = field(default_factory=dict)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def check_tracker(name: str, uri: str, options: dict[str, Any] | None = None) -> None:
    """Hold the backend registered as `name`, writing to store `uri`, to the Tracker protocol."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConformanceError(f"tracking backend {name!r}: {what}")

    cls = backend(name)
    need(getattr(cls, "backend", None) == name, f"its class says backend = {getattr(cls, 'backend', None)!r}")
    settings = _Settings(name, uri, options=dict(options or {}))
    need(isinstance(cls.resolve_uri(uri), str), "resolve_uri must return the store as a string")
    run = start_run(settings, {"train.lr": 0.001, "model.d_model": 64}, {"omnistream.kind": "conformance"}, "a run")
    need(isinstance(run, Tracker), "what start() returns lacks methods of the Tracker protocol")
    need(bool(run.run_id) and isinstance(run.run_id, str), "a started run has no run_id")
    run.log({"train/loss": 3.0, "train/lr": 0.001}, 1)
    run.log({"train/loss": 2.0}, 2, timestamp_ms=1_700_000_000_000)
    run.log({"train/loss": None, "eval/loss": 2.5}, 2)  # None: not measured at this step, skipped
    run.set_tag("omnistream.status", "RUNNING")
    run.log_text("name = 'x'\n", "config/resolved.toml")
    run.log_artifact(b"\x00\x01", "blob.bin", "data")
    run.log_image("samples/text_to_image", _png(), 2)
    run.log_table({"key": ["a", "b"], "correct": [True, False]}, "samples/step_000002/task.json")
    run.flush()

    # a second handle on the same run, as rank 0 or a resumed run gets it
    again = attach(settings, run.run_id)
    need(again.run_id == run.run_id, "attach() returned another run")
    again.log({"train/loss": 1.0}, 3)
    again.set_tag("omnistream.status", "FINISHED")
    again.flush()
    history = [(int(s), float(v)) for s, v in again.metric_history("train/loss")]
    need(
        history == [(1, 3.0), (2, 2.0), (3, 1.0)],
        f"metric_history('train/loss') is {history}, not the values logged by both handles in step order",
    )
    need(again.metric_history("never/logged") == [], "metric_history of a metric never logged must be []")
    final = again.final_metrics()
    need(
        final.get("train/loss") == 1.0 and final.get("eval/loss") == 2.5,
        f"final_metrics() is {final}: each metric's last value",
    )
    tags = again.tags()
    need(
        tags.get("omnistream.status") == "FINISHED",
        f"tags() gives {tags.get('omnistream.status')!r} for a tag set twice; the last value set wins",
    )
    need(tags.get("omnistream.kind") == "conformance", "the tags a run was started with are not in tags()")
    need(isinstance(again.link(), str) and again.link() != "", "link() must say where to look at the run")
    again.finish("FINISHED")
    run.finish("FINISHED")
