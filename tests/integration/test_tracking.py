"""The Tracker contract, the same for every backend: MLflow (a real SQLite store) and TensorBoard (real
event files, read back with TensorBoard's own reader). What the driver and the ranks record goes through
these calls alone, so a backend that passes here serves a whole run."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from omnistream import tracking
from omnistream.configs import TrackingConfig
from omnistream.tracking.tensorboard_backend import TensorBoardTracker


@pytest.fixture(params=["mlflow", "tensorboard"])
def settings(request, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db" if request.param == "mlflow" else str(tmp_path / "tb")
    return TrackingConfig(backend=request.param, uri=uri, experiment="contract", run_name="one run")


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _artifact(t, rel: str) -> bytes:
    """An artifact's bytes, as each store keeps it."""
    if t.backend == "mlflow":
        import mlflow.artifacts

        return open(
            mlflow.artifacts.download_artifacts(run_id=t.run_id, artifact_path=rel, tracking_uri=t.uri), "rb"
        ).read()
    return (t.dir / "artifacts" / rel).read_bytes()


def test_a_run_written_from_two_processes_reads_back_whole(settings):
    run = tracking.start_run(
        settings,
        {"model.n_layers": 2, "train.lr": 0.003},
        {"omnistream.vocab_fingerprint": "ab"},
        description="**a** run",
    )
    assert run.backend == settings.backend and run.run_id
    run.log_text("[train]\nsteps = 4\n", "config/resolved.toml")
    # rank 0 attaches to the run by id, as a Ray Train worker does, and logs the steps
    rank0 = tracking.BufferedTracker(tracking.attach(settings, run.run_id))
    for step in (1, 2, 3):
        rank0.log({"train/loss": 4.0 - step, "train/loss/text": 5.0 - step, "train/loss/image": 6.0 - step}, step)
    rank0.set_tag("data.ledger_digest", "d1g35t")
    rank0.log_image("text_to_image/0_3", _png(200), 3)
    rank0.log_artifact(b"RIFF....", "text_to_audio_0_3.wav", "samples/step_000003")
    rank0.log_table({"key": ["a"], "correct": [True]}, "samples/step_000003/image_to_text.json")
    assert rank0.close(timeout=60)
    # a resumed run attaches later and continues the step axis
    resumed = tracking.attach(settings, run.run_id)
    resumed.log({"train/loss": 0.5}, 4)
    resumed.flush()
    run.log({"data/seen": 10.0, "data/kept": 9.0}, 4)
    run.finish("FINISHED")

    reader = tracking.attach(settings, run.run_id)
    assert reader.metric_history("train/loss") == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    assert [s for s, _ in reader.metric_history("train/loss/image")] == [1, 2, 3]
    assert reader.metric_history("never/logged") == []
    final = reader.final_metrics()
    assert final["train/loss"] == 0.5 and final["data/kept"] == 9.0 and final["train/loss/text"] == 2.0
    tags = reader.tags()
    assert tags["data.ledger_digest"] == "d1g35t" and tags["omnistream.vocab_fingerprint"] == "ab"
    assert _artifact(reader, "config/resolved.toml").decode() == "[train]\nsteps = 4\n"
    assert _artifact(reader, "samples/step_000003/text_to_audio_0_3.wav") == b"RIFF...."
    assert json.loads(_artifact(reader, "samples/step_000003/image_to_text.json"))  # a table, as JSON
    assert reader.link()


def test_an_unknown_backend_is_a_user_error_naming_the_installed_ones(tmp_path):
    from omnistream.common.errors import UserError

    with pytest.raises(
        UserError, match=r"tracking.backend 'wandb' is not installed \(installed: .*mlflow.*tensorboard"
    ):
        tracking.start_run(TrackingConfig(backend="wandb", uri=str(tmp_path)), {}, {})


def test_tensorboard_images_and_params_are_in_the_event_files(tmp_path):
    """What TensorBoard itself shows: the image with its step, the params as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = TrackingConfig(backend="tensorboard", uri=str(tmp_path), experiment="e", run_name="r")
    run = tracking.start_run(s, {"train.lr": 0.01}, {})
    run.log_image("text_to_image/0_7", _png(90), 5)
    run.finish()
    acc = EventAccumulator(str(run.dir), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert [e.step for e in acc.Images("text_to_image/0_7")] == [5]
    assert any(t.startswith("params") for t in acc.Tags()["tensors"])


def test_the_tracking_server_refuses_a_port_someone_else_bound_first(tmp_path):
    """The port is picked free, released, then bound by MLflow: a process that binds it in between answered
    the health check and would have received the jobs' runs and password. Here one holds it from the start
    and answers /health; the server is not reported started, and ours is ended."""
    import http.server
    import threading

    import psutil

    from omnistream.common.errors import UserError
    from omnistream.tracking.server import start_tracking_server

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    port = impostor.server_address[1]
    try:
        with pytest.raises(UserError, match=f"port {port} .* taken by another process"):
            start_tracking_server(tmp_path / "store", port, timeout=60)
    finally:
        impostor.shutdown()
        impostor.server_close()
    store = str(tmp_path / "store")
    assert not [q.pid for q in psutil.process_iter(["cmdline"]) if any(store in a for a in q.info["cmdline"] or [])]


@pytest.mark.parametrize("name", ["mlflow", "tensorboard"])
def test_every_shipped_backend_passes_the_kit(name, tmp_path):
    from omnistream.tracking.conformance import check_tracker

    check_tracker(name, f"sqlite:///{tmp_path}/m.db" if name == "mlflow" else str(tmp_path / "tb"))


class ForgetsTheSecondHandle(TensorBoardTracker):
    """A backend whose attach() starts a fresh run folder: what a resumed run would then lose."""

    backend = "forgetful"

    @classmethod
    def attach(cls, settings, run_id):
        return cls.start(settings, {}, {})


def test_the_tracker_kit_fails_a_backend_that_loses_a_handles_writes(tmp_path, monkeypatch):
    from omnistream.common.errors import ConformanceError
    from omnistream.tracking.conformance import check_tracker

    monkeypatch.setitem(tracking.BACKENDS, "forgetful", ForgetsTheSecondHandle)
    with pytest.raises(ConformanceError, match="tracking backend 'forgetful': attach"):
        check_tracker("forgetful", str(tmp_path / "tb"))


def test_backend_options_are_checked_by_the_backend_and_used(tmp_path):
    """[tracking.options] belong to the backend: TensorBoard's flush_secs reaches its writer; an unknown option,
    or options for a backend that takes none, are refused when the config loads."""
    from pydantic import ValidationError

    from omnistream.common.errors import UserError

    cfg = TrackingConfig(backend="tensorboard", uri=str(tmp_path), options={"flush_secs": 0.5})
    run = tracking.start_run(cfg, {}, {})
    assert run.w._async_writer._worker._flush_secs == 0.5  # TensorBoard's writer thread's interval (its default: 120)
    run.finish()
    with pytest.raises(ValidationError, match="flush_sec"):
        TrackingConfig(backend="tensorboard", uri=str(tmp_path), options={"flush_sec": 1})
    with pytest.raises(UserError, match="tracking backend 'mlflow' takes no options"):
        TrackingConfig(backend="mlflow", options={"flush_secs": 1})
