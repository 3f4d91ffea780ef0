"""The conformance kit: one call a plugin author puts in their own tests.

    from omnistream.modalities.conformance import check_modality

    def test_my_plugin_conforms():
        check_modality(MyModality, samples=[("gif", gif_bytes), ...])

It checks what omnistream relies on (the way scikit-learn's `check_estimator`
checks an estimator): the declared attributes, fitting, ids in range,
deterministic encoding, decode(encode(x)) within the declared error bound,
decode of any id sequence of the block (empty, short, every id, random), a
vocab_size that save/load keeps,
fitted state surviving save/load and pickling into another process (what
Ray does to a tokenizer actor), the bytes round trip, and bad bytes raising
the project's `BadSample` rather than anything else. The first failure raises
`ConformanceError` naming the check and the plugin.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import re
import tempfile
from collections.abc import Iterable

import numpy as np

from omnistream.common.errors import BadSample, ConformanceError

from .base import BaseModality, FilterOptions, ModalityOptions


def _fail(mod, check: str, detail: str):
    raise ConformanceError(f"{getattr(mod, 'name', mod)!r} fails '{check}': {detail}")


def _encode_in_child(payload: bytes, obj_payload: bytes) -> list[int]:
    m = pickle.loads(payload)
    return m.encode(pickle.loads(obj_payload)).tolist()


def check_declaration(cls: type) -> None:
    """Class attributes the registry, the vocabulary and Ray scheduling read."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        _fail(cls, "name", f"must be a lower-case identifier, got {name!r}")
    if not isinstance(getattr(cls, "version", None), str) or not cls.version:
        _fail(cls, "version", "must be a non-empty string (bump it when the encoding changes meaning)")
    keys = getattr(cls, "keys", None)
    if (
        not isinstance(keys, tuple)
        or not keys
        or not all(isinstance(k, str) and k == k.lower() and "." not in k for k in keys)
    ):
        _fail(cls, "keys", f"must be a non-empty tuple of lower-case file extensions without dots, got {keys!r}")
    opts = getattr(cls, "Options", None)
    if not (isinstance(opts, type) and issubclass(opts, ModalityOptions)):
        _fail(cls, "Options", "must subclass omnistream.modalities.ModalityOptions (typed, unknown keys refused)")
    filters = getattr(cls, "Filters", FilterOptions)
    if not (isinstance(filters, type) and issubclass(filters, FilterOptions)):
        _fail(cls, "Filters", "must subclass omnistream.modalities.FilterOptions (quality filters are switchable)")
    res = getattr(cls, "resources", None)
    if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in res.values()):
        _fail(cls, "resources", f"must map Ray resource names to non-negative numbers, got {res!r}")
    eb = getattr(cls, "error_bound", None)
    if not isinstance(eb, (int, float)) or eb < 0:
        _fail(cls, "error_bound", f"must be a non-negative number, got {eb!r}")
    try:
        opts(no_such_option=1)
    except Exception:  # noqa: BLE001 - any refusal will do; only accepting it is wrong
        pass
    else:
        _fail(cls, "Options", "accepted an unknown option; set model_config extra='forbid' (ModalityOptions does)")


def check_modality(
    plugin: type | BaseModality,
    samples: Iterable[tuple[str, bytes]],
    *,
    options: dict | None = None,
    bad_samples: Iterable[tuple[str, bytes]] = (),
    subprocess: bool = True,
) -> BaseModality:
    """Run every check on `plugin` (a class, or an instance to refit) with `samples` = (ext, bytes) pairs.

    Returns the fitted instance. `bad_samples` adds plugin-specific broken inputs to the generic ones
    (empty bytes, random bytes, each sample cut in half).
    """
    cls = plugin if isinstance(plugin, type) else type(plugin)
    check_declaration(cls)
    mod = cls(options or {}) if isinstance(plugin, type) else plugin
    samples = list(samples)
    if len(samples) < 2:
        _fail(cls, "samples", "give at least two (ext, bytes) samples")

    # decode_bytes -> fit
    objs = []
    for ext, data in samples:
        if ext not in cls.keys:
            _fail(mod, "samples", f"sample extension {ext!r} is not among the declared keys {cls.keys}")
        try:
            objs.append(mod.decode_bytes(ext, data))
        except BadSample as e:
            _fail(mod, "decode_bytes", f"a good sample was refused: {e}")
    mod.fit([mod.fit_features(o) for o in objs])
    if not mod.is_fitted:
        _fail(mod, "fit", "is_fitted is False after fit()")
    V = mod.vocab_size
    if not isinstance(V, int) or V <= 0:
        _fail(mod, "vocab_size", f"must be a positive int after fitting, got {V!r}")

    # quality filters and near-duplicate signatures: the pipeline calls them on every decoded object
    filters = type(mod).Filters()
    for o in objs:
        reason = mod.quality_reason(o, filters)
        if reason is not None and not (isinstance(reason, str) and re.fullmatch(r"[a-z][a-z0-9_]*", reason)):
            _fail(mod, "quality_reason", f"must return None or a metric-safe reason name, got {reason!r}")
        sigs = mod.near_signatures(o, filters)
        if not isinstance(sigs, list) or not all(
            isinstance(t, tuple)
            and len(t) == 3
            and isinstance(t[0], str)
            and (t[1] is None or isinstance(t[1], int))
            and isinstance(t[2], int)
            for t in sigs
        ):
            _fail(mod, "near_signatures", f"must return a list of (str, int | None, int) triples, got {sigs!r:.200}")

    # encode: in range, deterministic; decode within the bound
    encoded = []
    for o in objs:
        ids = np.asarray(mod.encode(o))
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            _fail(mod, "encode", f"must return a non-empty 1-D integer array, got shape {ids.shape} {ids.dtype}")
        if ids.min() < 0 or ids.max() >= V:
            _fail(mod, "encode", f"ids outside [0, {V}): min {ids.min()}, max {ids.max()}")
        if not np.array_equal(ids, np.asarray(mod.encode(o))):
            _fail(mod, "encode", "is not deterministic: two calls on one object differ")
        err = mod.roundtrip_error(o, mod.decode(ids))
        if not err <= cls.error_bound:
            _fail(mod, "roundtrip", f"decode(encode(x)) error {err:.4g} > declared error_bound {cls.error_bound}")
        encoded.append(ids)

    # bytes round trip: what generation writes can be read back
    ext, data = mod.to_bytes(mod.decode(encoded[0]))
    if ext not in cls.keys:
        _fail(mod, "to_bytes", f"wrote extension {ext!r}, which the plugin does not read")
    mod.decode_bytes(ext, data)

    check_any_ids(mod, V)
    check_spans(mod, V)

    # persistence: save/load and pickling keep the fingerprint and the ids
    fp = mod.fingerprint()
    with tempfile.TemporaryDirectory() as d:
        mod.save(d)
        fresh = cls(options or {})
        fresh.load(d)
    if fresh.fingerprint() != fp or not np.array_equal(fresh.encode(objs[0]), encoded[0]):
        _fail(mod, "save/load", "the loaded tokenizer differs from the saved one")
    if fresh.vocab_size != V:
        # a bundle's id layout is its modalities' vocab_size: it must follow from the options and the saved
        # state alone, and code that computes it otherwise is a new `version` (docs/plugins.md)
        _fail(mod, "vocab_size", f"{V} when fitted, {fresh.vocab_size} after save/load")
    try:
        payload = pickle.dumps(mod)
        clone = pickle.loads(payload)
    except Exception as e:  # noqa: BLE001 - this is the check
        _fail(mod, "pickle", f"{type(e).__name__}: {e} (Ray ships tokenizers to actors by pickling them)")
    if clone.fingerprint() != fp or not np.array_equal(clone.encode(objs[0]), encoded[0]):
        _fail(mod, "pickle", "the unpickled tokenizer differs")
    if subprocess:
        # a fresh interpreter, as a Ray actor would be: nothing may depend on this process's state
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            ids = pool.apply(_encode_in_child, (payload, pickle.dumps(objs[0])))
        if ids != encoded[0].tolist():
            _fail(mod, "pickle into another process", "encodes differently there")

    # bad bytes: BadSample, never another exception
    rng = np.random.default_rng(0)
    ext0 = samples[0][0]
    bad = [(ext0, b""), (ext0, rng.integers(0, 256, 512, dtype=np.uint8).tobytes())]
    bad += [(e, d[: len(d) // 2]) for e, d in samples[:3] if len(d) > 64]
    for ext, data in list(bad) + list(bad_samples):
        try:
            mod.decode_bytes(ext, data)
        except BadSample as e:
            if not isinstance(e.reason, str) or not e.reason:
                _fail(mod, "bad bytes", "BadSample needs a reason name")
        except Exception as e:  # noqa: BLE001 - this is the check
            _fail(mod, "bad bytes", f"{len(data)} bad bytes raised {type(e).__name__} ({e}), not BadSample")
        # a truncated file that still decodes is fine: formats with trailing padding do
    return mod


def check_any_ids(mod: BaseModality, V: int) -> None:
    """decode takes any id sequence of the block: evaluation and generation decode what a model generated,
    which may be empty, one or two ids long, or any ids at all. Each decoded object is written with
    to_bytes; where it reads back, its encoding stays in [0, vocab_size) (a fuzz of the encoder with
    inputs the samples did not have)."""
    rng = np.random.default_rng(1)
    seqs = [[], [0], [V - 1], list(range(V))] + [rng.integers(0, V, n).tolist() for n in (1, 2, 3, 17, 64)]
    for ids in seqs:
        what = "every id of the block" if len(ids) == V and ids == list(range(V)) else f"{len(ids)} ids"
        try:
            obj = mod.decode(np.asarray(ids, dtype=np.int64))
            ext, data = mod.to_bytes(obj)
        except Exception as e:  # noqa: BLE001 - this is the check
            _fail(
                mod,
                "decode any ids",
                f"decode/to_bytes of {what} raised {type(e).__name__}: {e} (evaluation and "
                f"generation decode raw model output: any sequence of [0, {V}), empty too)",
            )
        if ext not in mod.keys:
            _fail(mod, "to_bytes", f"wrote extension {ext!r} for {what}, which the plugin does not read")
        try:
            back = mod.decode_bytes(ext, data)
        except BadSample:
            continue  # e.g. a clip too short to keep: refused as a sample, which is allowed
        again = np.asarray(mod.encode(back))
        if again.size and (again.min() < 0 or again.max() >= V):
            _fail(
                mod,
                "encode",
                f"ids outside [0, {V}) for a decoded {what}: min {again.min()}, max {again.max()} "
                f"(is vocab_size one too small?)",
            )


def check_spans(mod: BaseModality, V: int, spans: int = 40, longest: int = 4096) -> None:
    """What `span` allows decodes: spans drawn at random under it (each place's ids from its [lo, hi), an end
    taken with probability 1/8 where allowed, and where lo == hi) decode and write with to_bytes; its ranges
    lie in [0, vocab_size); it lets every span end within `longest` places. A plugin without `span` is held
    to its default (any id of the block, an end after the first)."""
    from .base import span_of

    rng = np.random.default_rng(2)
    for _ in range(spans):
        ids: list[int] = []
        while True:
            lo, hi, may_end = span_of(mod, len(ids))
            if not (0 <= lo <= hi <= V) or (lo == hi and not may_end):
                _fail(
                    mod,
                    "span",
                    f"span({len(ids)}) = {(lo, hi, may_end)}: ids [lo, hi) within [0, {V}), and "
                    "an end allowed where no id is",
                )
            if lo == hi or (may_end and rng.random() < 1 / 8):
                break
            if len(ids) >= longest:
                _fail(mod, "span", f"span() lets no span end within {longest} places")
            ids.append(int(rng.integers(lo, hi)))
        try:
            mod.to_bytes(mod.decode(np.asarray(ids, dtype=np.int64)))
        except Exception as e:  # noqa: BLE001 - this is the check
            _fail(mod, "span", f"a span of {len(ids)} ids that span() allows does not decode: {type(e).__name__}: {e}")


__all__ = ["check_modality", "check_declaration", "check_any_ids", "check_spans", "ConformanceError"]
