"""The TensorBoard backend (`tracking.backend = "tensorboard"`): a run is a folder of event files.

    <uri>/<experiment>/<run name>-<first 8 of the run id>/
        events.out.tfevents.*    scalars (every metric), images, text (params, tags, status); one file per
                                 process that logged (the driver, rank 0, a resumed run)
        run.json                 the run's id and name
        artifacts/...            files (the resolved config, the data report, tables, samples)

Open it with `tensorboard --logdir <uri> --host 127.0.0.1`. Written with TensorBoard's own event-file
writer and protos (no torch, no TensorFlow) and read back with its own reader
(tensorboard.backend.event_processing), which is also how the CLI prints a run's summary. Not with
tensorboardX's SummaryWriter: its flush() does not wait for its queue (measured here: the last scalars
and images of a run were missing when read right after), where TensorBoard's writer's flush() does. The folder must
be reachable by rank 0 wherever it runs (a
shared disk on a multi-node cluster); there is no model registry and no system-metrics monitor here.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RUN_META = "run.json"


class TensorBoardOptions(BaseModel):
    """[tracking.options] for backend = "tensorboard"."""

    model_config = ConfigDict(extra="forbid")
    flush_secs: float = Field(
        5.0,
        gt=0,
        description="seconds between flushes of the event file (TensorBoard's writer "
        "waits 120 s by default; 5 lets a watcher see the run move)",
    )


class TensorBoardTracker:
    backend = "tensorboard"

    Options = TensorBoardOptions

    def __init__(self, uri: str, run_id: str, run_dir: Path, options: TensorBoardOptions | None = None):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.uri, self.run_id, self.dir = uri, run_id, Path(run_dir)
        # one event file per process (the suffix keeps two processes of one second apart); flushed every
        # options.flush_secs, and on flush() and finish()
        options = options or TensorBoardOptions()
        self.w = EventFileWriter(
            str(self.dir), flush_secs=options.flush_secs, filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:6]}"
        )

    def _add(self, step: int, values: list, wall: float | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.w.add_event(Event(wall_time=wall or time.time(), step=step, summary=Summary(value=values)))

    def _text(self, tag: str, text: str, step: int = 0) -> None:
        """A text summary, as TensorBoard's text plugin reads it: a string tensor tagged for the plugin."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.compat.proto.types_pb2 import DT_STRING

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(
            dtype=DT_STRING,
            string_val=[text.encode()],
            tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
        )
        self._add(step, [Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    # ---- the backend ---------------------------------------------------------------------------------
    @classmethod
    def resolve_uri(cls, uri: str) -> str:
        path = uri.removeprefix("file://") or "runs/tensorboard"
        if "://" in path:
            from omnistream.common.errors import UserError

            raise UserError(f"tracking.uri {uri!r}: the tensorboard backend writes to a folder (a path)")
        return os.path.abspath(path)

    @classmethod
    def start(cls, settings, params: dict[str, Any], tags: dict[str, str], description: str = "") -> TensorBoardTracker:
        uri = cls.resolve_uri(settings.uri)
        run_id = uuid.uuid4().hex
        name = settings.run_name or "run"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:64] or "run"
        d = Path(uri) / settings.experiment / f"{slug}-{run_id[:8]}"
        d.mkdir(parents=True, exist_ok=True)
        (d / RUN_META).write_text(
            json.dumps(
                {"run_id": run_id, "run_name": name, "experiment": settings.experiment, "started": time.time()},
                indent=1,
            )
        )
        t = cls(uri, run_id, d, TensorBoardOptions(**getattr(settings, "options", {})))
        t.log_params(params)
        for k, v in tags.items():
            t.set_tag(k, v)
        if description:
            t._text("description", description)
        return t

    @classmethod
    def attach(cls, settings, run_id: str) -> TensorBoardTracker:
        uri = cls.resolve_uri(settings.uri)
        for meta in (Path(uri) / settings.experiment).glob(f"*-{run_id[:8]}/{RUN_META}"):
            if json.loads(meta.read_text()).get("run_id") == run_id:
                return cls(uri, run_id, meta.parent, TensorBoardOptions(**getattr(settings, "options", {})))
        from omnistream.common.errors import UserError

        raise UserError(f"no TensorBoard run {run_id} under {uri}/{settings.experiment}")

    # ---- writing -------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items() if v is not None]
        if values:
            self._add(step, values, (timestamp_ms / 1000) if timestamp_ms else None)

    def log_params(self, params: dict[str, Any]) -> None:
        if not params:
            return
        self._write("params.json", json.dumps(params, indent=1, sort_keys=True, default=str).encode())
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self._text("params", f"| param | value |\n|---|---|\n{table}")

    def set_tag(self, key: str, value: str) -> None:
        self._text(f"tags/{key}", str(value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write(artifact_file, text.encode())

    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None:
        self._write(f"{artifact_path}/{name}", data)

    def log_image(self, key: str, png: bytes, step: int) -> None:
        import io

        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        im = Image.open(io.BytesIO(png))  # the PNG goes in as it is; its size and channels are its header's
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode, 3)
        self._add(
            step,
            [
                Summary.Value(
                    tag=key,
                    image=Summary.Image(
                        height=im.height, width=im.width, colorspace=channels, encoded_image_string=png
                    ),
                )
            ],
        )

    def log_table(self, rows: dict[str, list], artifact_file: str) -> None:
        self._write(artifact_file, json.dumps(rows, indent=1, default=str).encode())

    def finish(self, status: str = "FINISHED") -> None:
        self.set_tag("omnistream.status", status)
        self.w.flush()

    def flush(self) -> None:
        self.w.flush()

    def _write(self, rel: str, data: bytes) -> None:
        p = (self.dir / "artifacts" / rel).resolve()
        if not p.is_relative_to((self.dir / "artifacts").resolve()):
            raise ValueError(f"artifact path {rel!r} leaves the run's folder")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    # ---- reading back, through TensorBoard's own reader ----------------------------------------------
    def _events(self):
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        self.w.flush()
        # every event file of the folder (each process that logged wrote its own), nothing sampled away;
        # no purging: the driver logs step-0 figures after rank 0 logged later steps, on other tags
        acc = EventAccumulator(
            str(self.dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0}, purge_orphaned_data=False
        )
        return acc.Reload()

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        acc = self._events()
        if key not in acc.Tags()["scalars"]:
            return []
        return [(e.step, e.value) for e in acc.Scalars(key)]

    def final_metrics(self) -> dict[str, float]:
        acc = self._events()
        return {k: acc.Scalars(k)[-1].value for k in acc.Tags()["scalars"]}

    def tags(self) -> dict[str, str]:
        acc = self._events()
        out = {}
        for tag in acc.Tags()["tensors"]:
            if tag.startswith("tags/"):  # the last value set wins, as in MLflow
                out[tag.removeprefix("tags/")] = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        return out

    def link(self) -> str:
        return f"tensorboard --logdir {self.uri} --host 127.0.0.1   # run {self.dir.relative_to(self.uri)}"

    def start_system_metrics(self, node_id: str, interval: float):
        return None  # MLflow's monitor only; the TensorBoard backend logs none
