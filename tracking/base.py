"""The `Tracker` interface, the registry of backends, and the in-memory tracker.

A backend is one class, registered under the `omnistream.trackers` entry-point group (omnistream's own
MLflow and TensorBoard backends register there like any third-party one; levanter's trackers register
the same way with `TrackerConfig.register_subclass`). `tracking.backend` in the config names it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Protocol, runtime_checkable

from omnistream.common.errors import UserError

GROUP = "omnistream.trackers"


class Settings(Protocol):
    """What a backend reads of the config's [tracking] section."""

    backend: str
    uri: str
    experiment: str
    run_name: str
    options: dict[str, Any]  # the backend's own settings ([tracking.options]), checked by its `Options` model


@runtime_checkable
class Tracker(Protocol):
    """One run in a tracking store: everything the driver and the ranks record goes through this.

    Writers (any process: the driver, rank 0, a resumed run attached to the same run id):
        log, log_params, set_tag, log_text, log_artifact, log_image, log_table, finish, flush
    Readers (the CLI's summary, the tests):
        metric_history, final_metrics, tags, link
    """

    backend: ClassVar[str]
    run_id: str
    uri: str

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None: ...
    def log_image(self, key: str, png: bytes, step: int) -> None: ...
    def log_table(self, rows: dict[str, list], artifact_file: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def flush(self) -> None: ...  # what this process wrote is in the store when it returns

    def metric_history(self, key: str) -> list[tuple[int, float]]: ...  # (step, value), in step order
    def final_metrics(self) -> dict[str, float]: ...
    def tags(self) -> dict[str, str]: ...
    def link(self) -> str: ...


class Backend(Protocol):
    """A tracker class with the two ways of getting one: a new run, or an existing run by id.

    Optional: `Options`, a pydantic model of the backend's own settings ([tracking.options]; checked when the
    config loads); `registry_uri(uri)`, the MLflow tracking URI whose model registry its runs' models are
    registered in (a backend without it has no registry: `train.register_as` is refused with its name).
    `tracking/conformance.py`'s `check_tracker` tests a backend in one call."""

    name: ClassVar[str]

    @classmethod
    def resolve_uri(cls, uri: str) -> str: ...
    @classmethod
    def start(
        cls, settings: Settings, params: dict[str, Any], tags: dict[str, str], description: str = ""
    ) -> Tracker: ...
    @classmethod
    def attach(cls, settings: Settings, run_id: str) -> Tracker: ...
    def start_system_metrics(self, node_id: str, interval: float): ...


# backends registered in this process (a test's, a notebook's), beside the entry points' installed ones
BACKENDS: dict[str, type] = {}


def backends() -> dict[str, Any]:
    """name -> entry point (or class) of every tracker backend: the installed ones, then BACKENDS."""
    from importlib.metadata import entry_points

    return {**{ep.name: ep for ep in entry_points(group=GROUP)}, **BACKENDS}


def backend(name: str) -> type:
    """The backend class registered as `name`; an unknown name is a UserError listing the installed ones."""
    found = backends()
    if name not in found:
        raise UserError(f"tracking.backend {name!r} is not installed (installed: {', '.join(sorted(found)) or 'none'})")
    return found[name] if isinstance(found[name], type) else found[name].load()


def start_run(settings: Settings, params: dict[str, Any], tags: dict[str, str], description: str = "") -> Tracker:
    """A new run in the configured backend."""
    return backend(settings.backend).start(settings, params, tags, description)


def attach(settings: Settings, run_id: str) -> Tracker:
    """The run `run_id` of the configured backend, to log into (rank 0, a resumed or restarted run)."""
    return backend(settings.backend).attach(settings, run_id)


def resolve_uri(backend_name: str, uri: str) -> str:
    """The store a run logs to: the config's, or the backend's default, made absolute where it is a path."""
    return backend(backend_name).resolve_uri(uri)


def backend_options(name: str, options: dict[str, Any]):
    """The backend's own settings, validated by its `Options` model (None when it has none and none are
    given); options for a backend that takes none are a UserError."""
    cls = backend(name)
    model = getattr(cls, "Options", None)
    if model is None:
        if options:
            raise UserError(f"tracking backend {name!r} takes no options (tracking.options names {sorted(options)})")
        return None
    return model(**options)


def registry_uri(backend_name: str, uri: str) -> str:
    """The MLflow tracking URI holding the model registry for runs of this backend and store; a backend
    without a model registry is a UserError naming it."""
    cls = backend(backend_name)
    if not hasattr(cls, "registry_uri"):
        raise UserError(
            f"registering a model needs MLflow's model registry; runs tracked by {backend_name!r} have "
            f"none (name one with --tracking-uri, or track the run with MLflow)"
        )
    return cls.registry_uri(uri)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)


class MemoryTracker:
    """Keeps everything in memory: for runs outside any store (the golden test, the GPU check, benches)."""

    backend = "memory"

    def __init__(self, run_id: str = "memory"):
        self.run_id, self.uri = run_id, ""
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.params: dict[str, Any] = {}
        self.artifacts: dict[str, bytes] = {}
        self.images: dict[str, list[tuple[int, bytes]]] = {}
        self.tables: dict[str, dict[str, list]] = {}
        self._tags: dict[str, str] = {}
        self.status: str | None = None

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        for k, v in metrics.items():
            if v is not None:
                self.history.setdefault(k, []).append((step, float(v)))

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def set_tag(self, key: str, value: str) -> None:
        self._tags[key] = value

    def log_text(self, text: str, artifact_file: str) -> None:
        self.artifacts[artifact_file] = text.encode()

    def log_artifact(self, data: bytes, name: str, artifact_path: str) -> None:
        self.artifacts[f"{artifact_path}/{name}"] = data

    def log_image(self, key: str, png: bytes, step: int) -> None:
        self.images.setdefault(key, []).append((step, png))

    def log_table(self, rows: dict[str, list], artifact_file: str) -> None:
        self.tables[artifact_file] = rows

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status

    def flush(self) -> None:
        pass

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return list(self.history.get(key, []))

    def final_metrics(self) -> dict[str, float]:
        return {k: v[-1][1] for k, v in self.history.items()}

    last = final_metrics

    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    def link(self) -> str:
        return "in memory"

    def start_system_metrics(self, node_id: str, interval: float):
        return None
