"""The Modality protocol: what a tokenizer plugin declares and does.

A modality turns one kind of WebDataset field (its `keys`, file extensions) into
local ids in ``[0, vocab_size)`` and back. The shared vocabulary (vocab.py) puts
each modality's block at an offset, so a plugin never sees global ids.

The protocol is deliberately small (levanter's ``BatchProcessor`` is the model):
declare resources so Ray can schedule the tokenizer, decode bytes, fit, encode,
decode, save/load. ``BaseModality`` gives the fingerprinting and persistence that
every plugin needs, so a plugin writes only the part that is about its data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# the errors a plugin raises live with every other error of omnistream's; importable from here as before
from omnistream.common.errors import UserError


class ModalityOptions(BaseModel):
    """Base for a plugin's typed options: unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FilterOptions(ModalityOptions):
    """A modality's quality filters and near-duplicate settings (`[data.quality.<name>]`).

    Plugins subclass this and add their own typed thresholds; every filter can be switched off.
    """

    enabled: bool = Field(True, description="apply this modality's quality filters")
    near_duplicates: bool = Field(
        True,
        description="drop records whose field is a near-duplicate of an earlier one's "
        "(where the modality defines near-duplicate signatures)",
    )


@runtime_checkable
class Modality(Protocol):
    """What the pipeline and the trainer need from a modality plugin."""

    name: ClassVar[str]  # config and metric name, e.g. "image"
    version: ClassVar[str]  # bump when fitted state or encoding changes meaning
    keys: ClassVar[tuple[str, ...]]  # WebDataset extensions consumed, e.g. ("jpg", "png")
    Options: ClassVar[type[ModalityOptions]]
    resources: ClassVar[dict[str, float]]  # what one tokenizer actor needs, e.g. {"num_cpus": 1}
    error_bound: ClassVar[float]  # max roundtrip_error of decode(encode(x)) on fit-like data
    Filters: ClassVar[type[FilterOptions]]  # typed quality-filter / near-duplicate settings

    options: ModalityOptions

    @property
    def vocab_size(self) -> int: ...
    @property
    def is_fitted(self) -> bool: ...

    def decode_bytes(self, ext: str, data: bytes) -> Any: ...
    def fit_features(self, obj: Any) -> Any: ...
    def fit(self, features: list[Any], progress: Callable[[int, int, dict], None] | None = None) -> None: ...
    def encode(self, obj: Any) -> np.ndarray: ...
    def decode(self, ids: np.ndarray) -> Any: ...
    def roundtrip_error(self, obj: Any, decoded: Any) -> float: ...
    def save(self, directory: str | os.PathLike) -> None: ...
    def load(self, directory: str | os.PathLike) -> None: ...
    def fingerprint(self) -> str: ...
    def to_bytes(self, obj: Any) -> tuple[str, bytes]: ...
    def quality_reason(self, obj: Any, filters: FilterOptions) -> str | None: ...
    def near_signatures(self, obj: Any, filters: FilterOptions) -> list[tuple[str, int | None, int]]: ...


class BaseModality:
    """Shared plumbing for plugins: options, persistence, fingerprints.

    Subclasses set the class attributes of ``Modality`` and implement
    ``decode_bytes``, ``fit_features``, ``fit``, ``encode``, ``decode``,
    ``roundtrip_error``, ``to_bytes``, ``_state()`` (a dict of numpy arrays and
    JSON-able values that fully defines the fitted tokenizer) and
    ``_set_state(state)``.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    keys: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[ModalityOptions]] = ModalityOptions
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1}
    error_bound: ClassVar[float] = 0.0
    Filters: ClassVar[type[FilterOptions]] = FilterOptions

    def __init__(self, options: ModalityOptions | dict | None = None):
        if options is None:
            options = self.Options()
        elif isinstance(options, dict):
            options = self.Options(**options)
        self.options = options
        self._fitted = False

    # ---- to implement -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # ---- generation (optional) ---------------------------------------------------
    def span(self, position: int) -> tuple[int, int, bool]:
        """What this modality can decode at place `position` (0, 1, ...) of a span a model writes: its local
        ids [lo, hi) there, and whether the span may end there (its end marker next); lo == hi says it must
        end. Generation holds the model to it (serving/generate.py), so every span decodes. By default:
        every id of the block, and an end anywhere after the first id."""
        return 0, self.vocab_size, position > 0

    # ---- data quality (optional) -------------------------------------------------
    def quality_reason(self, obj: Any, filters: FilterOptions) -> str | None:
        """Why a decoded object is not worth learning from (`data/filtered/<reason>`), or None.

        The bytes were fine (those are BadSample errors); the content is not. By default nothing
        is filtered. Reasons are metric names: start them with the modality name, e.g. `text_too_short`.
        """
        return None

    def near_signatures(self, obj: Any, filters: FilterOptions) -> list[tuple[str, int | None, int]]:
        """Near-duplicate signatures of a decoded object: (signature, payload, max_distance) triples.

        Two records sharing a signature are near-duplicates; with a payload (an integer hash) the
        shared signature is only a candidate, confirmed when the payloads differ in at most
        max_distance bits. By default a modality has none (the exact byte-level check still applies).
        """
        return []

    # ---- shared --------------------------------------------------------------
    def fit_features(self, obj: Any) -> Any:
        """What `fit` learns from, per sample; by default the decoded object itself."""
        return obj

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"modality {self.name!r} is not fitted: run `omnistream tokenizers fit` first")

    def _mark_fitted(self) -> None:
        self._fitted = True

    def save(self, directory: str | os.PathLike) -> None:
        """Write the fitted state as ``state.safetensors`` (arrays: codebooks, a learned tokenizer's weights)
        + ``state.json`` (the rest, with the arrays file's sha256). safetensors holds bare tensors, so loading
        one runs no code (a pickle could)."""
        from safetensors.numpy import save_file

        self._require_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays, rest = _split_state(self._state())
        for k, a in arrays.items():  # a NaN row in a codebook is nearest to nothing: every frame would map to it
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                raise UserError(
                    f"the fitted {self.name} tokenizer's {k!r} holds NaN or inf "
                    f"({int((~np.isfinite(a)).sum())} values): not saved; the fit samples had "
                    f"values no decoder check caught"
                )
        save_file({k: np.ascontiguousarray(a) for k, a in arrays.items()}, str(d / WEIGHTS))
        meta = {
            "name": self.name,
            "version": self.version,
            "options": self.options.model_dump(mode="json"),
            "state": rest,
            "weights_sha256": hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest(),
        }
        (d / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    def load(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        meta = json.loads((d / "state.json").read_text())
        if meta.get("name") != self.name:
            raise UserError(f"tokenizer state in {d} is for modality {meta.get('name')!r}, not {self.name!r}")
        if meta.get("version") != self.version:
            raise UserError(
                f"tokenizer state in {d} was fitted by {self.name} version {meta.get('version')}, "
                f"the installed plugin is version {self.version}: refit with `omnistream tokenizers fit`"
            )
        self.options = self.Options(**meta["options"])
        if (d / WEIGHTS).exists():
            from safetensors import SafetensorError
            from safetensors.numpy import load

            data = (d / WEIGHTS).read_bytes()
            if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
                raise UserError(
                    f"{d / WEIGHTS} is not the file its tokenizer was saved with (its sha256 differs "
                    f"from state.json's): refit with `omnistream tokenizers fit` or restore the bundle"
                )
            try:
                arrays = load(data)
            except SafetensorError as e:
                raise UserError(f"{d / WEIGHTS} cannot be read: {e}") from None
        else:  # a bundle written before safetensors: numpy's format, read without pickle
            with np.load(d / "state.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        self._set_state({**meta["state"], **arrays})
        self._fitted = True

    # ---- fits that train a model (optional) -----------------------------------------
    def fit_resources(self, cluster: dict[str, float]) -> dict[str, float] | None:
        """Ray resources for a fit that trains a model, given what one node can offer (``{"CPU": n, "GPU": g}``,
        the largest node's): such a fit runs as a Ray task with them (on a GPU when it asks for one), its torch
        threads set to its CPUs. None (the default): the fit is light (k-means, BPE) and runs in the process
        that gathered the samples."""
        return None

    @staticmethod
    def fit_curves(total: int, names: tuple[str, ...], progress: Callable[[int, int, dict], None] | None = None):
        """For a fit that trains a network over `total` steps: an `on_step(step, metrics)` callback that keeps
        about 200 points of each named curve for the tracker and drives `progress`; returns (on_step, the
        steps kept, {name: values})."""
        every = max(1, total // 200)
        curves: dict[str, list[float]] = {k: [] for k in names}
        steps: list[int] = []

        def on_step(step: int, m: dict) -> None:
            if step % every == 0 or step == total - 1:
                steps.append(step)
                for k, v in curves.items():
                    v.append(m[k])
            if progress is not None:
                progress(step + 1, total, m)

        return on_step, steps, curves

    @staticmethod
    def trained_fit_resources(cluster: dict[str, float]) -> dict[str, float]:
        """What a fit that trains a network asks for: a GPU and a CPU where a node has a GPU, else every CPU of
        the node (the fit's convolutions use them all, one thread each)."""
        if cluster.get("GPU", 0) >= 1:
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_cpus": max(1, int(cluster.get("CPU", 1)))}

    def fit_report(self) -> dict[str, Any]:
        """What the last fit has to show in the tracker: ``{"metrics": {name: [one value per step]},
        "images": {name: png bytes}, "audio": {name: wav bytes}, "summary": {name: number}}``. Empty for a
        fit that trains nothing."""
        return {}

    def _fingerprint_options(self) -> dict[str, Any]:
        """The options the fingerprint covers: all of them, unless a plugin leaves out those that do not
        change its mapping (a field added later must leave the fingerprints of bundles fitted before it
        alone, or every such bundle stops loading)."""
        return self.options.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 over name, version, options and fitted state: equal iff the tokenizer maps alike."""
        self._require_fitted()
        h = hashlib.sha256()
        h.update(f"{self.name}\0{self.version}\0".encode())
        h.update(json.dumps(self._fingerprint_options(), sort_keys=True).encode())
        arrays, rest = _split_state(self._state())
        h.update(json.dumps(rest, sort_keys=True).encode())
        for k in sorted(arrays):
            a = np.ascontiguousarray(arrays[k])
            h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    def __getstate__(self):
        # Pickled into Ray actors: carry options and fitted state, nothing else.
        return {"options": self.options.model_dump(mode="json"), "state": self._state() if self._fitted else None}

    def __setstate__(self, st):
        self.__init__(st["options"])
        if st["state"] is not None:
            self._set_state(st["state"])
            self._fitted = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r}, fitted={self._fitted})"


WEIGHTS = "state.safetensors"


def _split_state(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    return arrays, rest


def sample_rows(features: Iterable[np.ndarray], limit: int, seed: int) -> np.ndarray:
    """Stack feature rows and keep at most ``limit`` of them, chosen by seed."""
    rows = np.concatenate(
        [np.asarray(f, dtype=np.float32).reshape(-1, np.asarray(f).shape[-1]) for f in features if len(f)], axis=0
    )
    if len(rows) > limit:
        rows = rows[np.random.default_rng(seed).choice(len(rows), limit, replace=False)]
    return rows


def kmeans(x: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> np.ndarray:
    """k-means++ init then Lloyd iterations, in torch (no scikit-learn dependency for one function).

    Returns the (k, d) codebook. Empty clusters are re-seeded from the points
    farthest from their centre, so all k codes stay in use.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    X = torch.as_tensor(x, dtype=torch.float32)
    n = X.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} samples, got {n}: fit on more data")
    # k-means++ on a subsample keeps init O(k * 20k) rather than O(k * n)
    sub = X[torch.randperm(n, generator=g)[: min(n, 20 * k)]]
    C = sub[torch.randint(len(sub), (1,), generator=g)]
    d2 = torch.cdist(sub, C).squeeze(1) ** 2
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        nxt = sub[torch.multinomial(p, 1, generator=g)]
        C = torch.cat([C, nxt])
        d2 = torch.minimum(d2, (torch.cdist(sub, nxt).squeeze(1)) ** 2)
    for _ in range(iters):
        dist = torch.cdist(X, C)
        a = dist.argmin(1)
        counts = torch.bincount(a, minlength=k).float()
        sums = torch.zeros_like(C).index_add_(0, a, X)
        newC = sums / counts.clamp(min=1).unsqueeze(1)
        empty = counts == 0
        if empty.any():
            far = dist.min(1).values.topk(int(empty.sum())).indices
            newC[empty] = X[far]
        if torch.allclose(newC, C, atol=1e-5):
            C = newC
            break
        C = newC
    return C.numpy()


def nearest(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook row for each row of x."""
    import torch

    return (
        torch.cdist(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(codebook, dtype=torch.float32))
        .argmin(1)
        .numpy()
        .astype(np.int64)
    )


def span_of(mod, position: int) -> tuple[int, int, bool]:
    """`mod.span(position)`, or, for a plugin that does not define it, every id of its block and an end
    anywhere after the first id."""
    span = getattr(mod, "span", None)
    return span(position) if span is not None else (0, mod.vocab_size, position > 0)
