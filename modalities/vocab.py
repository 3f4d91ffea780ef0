"""The shared id space: specials, a begin/end marker per modality, then each block.

    0 <pad>   1 <bos>   2 <eos>
    3,4       <begin:m0>, <end:m0>        (one pair per modality, config order)
    ...
    base      m0's block  [base, base + m0.vocab_size)
    ...       m1's block, and so on.

`vocab.json` records this layout with each tokenizer's version and
fingerprint; a checkpoint stores the layout's fingerprint and refuses to load
against a different one (docs/architecture.md, Vocabulary).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from omnistream.common.errors import UserError

from . import registry
from .base import BaseModality, span_of

SPECIALS = {"pad": 0, "bos": 1, "eos": 2}
PAD, BOS, EOS = 0, 1, 2


class Vocabulary:
    def __init__(self, modalities: Sequence[BaseModality]):
        self.modalities = list(modalities)
        self.names = [m.name for m in self.modalities]
        if len(set(self.names)) != len(self.names):
            raise UserError(f"a modality is named twice in the vocabulary: {self.names}")
        self.by_name = {m.name: m for m in self.modalities}
        n = len(self.modalities)
        self._markers = {name: (3 + 2 * i, 4 + 2 * i) for i, name in enumerate(self.names)}
        off = 3 + 2 * n
        self._offsets = {}
        for m in self.modalities:
            self._offsets[m.name] = off
            off += m.vocab_size
        self.size = off
        # token id -> modality index (1-based; 0 = the shared specials), for per-modality loss
        self._owner = np.zeros(self.size, dtype=np.int64)
        for i, name in enumerate(self.names, start=1):
            b, e = self._markers[name]
            self._owner[[b, e]] = i
            o = self._offsets[name]
            self._owner[o : o + self.by_name[name].vocab_size] = i

    # ---- ids ------------------------------------------------------------------
    def begin(self, name: str) -> int:
        return self._markers[name][0]

    def end(self, name: str) -> int:
        return self._markers[name][1]

    def offset(self, name: str) -> int:
        return self._offsets[name]

    def block(self, name: str) -> tuple[int, int]:
        """[lo, hi) global ids of a modality's own tokens."""
        o = self._offsets[name]
        return o, o + self.by_name[name].vocab_size

    def to_global(self, name: str, local: np.ndarray) -> np.ndarray:
        local = np.asarray(local, dtype=np.int64)
        size = self.by_name[name].vocab_size
        if local.size and (local.min() < 0 or local.max() >= size):
            raise ValueError(f"modality {name!r} produced ids outside [0, {size})")
        return local + self._offsets[name]

    def to_local(self, name: str, ids: np.ndarray) -> np.ndarray:
        lo, hi = self.block(name)
        ids = np.asarray(ids, dtype=np.int64)
        return ids[(ids >= lo) & (ids < hi)] - lo

    def modality_index(self, name: str) -> int:
        return self.names.index(name) + 1

    def owner(self, ids: np.ndarray) -> np.ndarray:
        return self._owner[np.asarray(ids, dtype=np.int64)]

    def document(self, parts: Sequence[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """[<bos>, <begin:a>, a…, <end:a>, <begin:b>, b…, <end:b>, <eos>] and each token's modality index."""
        toks, mods = [np.array([BOS])], [np.array([0])]
        for name, local in parts:
            seg = np.concatenate([[self.begin(name)], self.to_global(name, local), [self.end(name)]])
            toks.append(seg)
            mods.append(np.full(len(seg), self.modality_index(name)))
        toks.append(np.array([EOS]))
        mods.append(np.array([0]))
        return np.concatenate(toks).astype(np.int64), np.concatenate(mods).astype(np.int64)

    def span_rule(self, dst: str):
        """rule(i) -> (lo, hi, may_end) in global ids for place i of a `dst` span (model.generate's `rule`): what
        `dst` can decode there (Modality.span), so that generation, evaluation and serving write only that."""
        mod, offset = self.by_name[dst], self.offset(dst)

        def rule(i: int) -> tuple[int, int, bool]:
            lo, hi, may_end = span_of(mod, i)
            return offset + lo, offset + hi, may_end

        return rule

    def prompt(self, src: str, local: np.ndarray, dst: str) -> list[int]:
        """[<bos>, <begin:src>, src ids…, <end:src>, <begin:dst>]: a document of `src` whose continuation
        is modality `dst` (what evaluation and generation ask the model for)."""
        return self.prompt_parts([(src, local)], dst)

    def prompt_parts(self, parts: Sequence[tuple[str, np.ndarray]], dst: str) -> list[int]:
        """[<bos>, <begin:a>, a…, <end:a>, <begin:b>, b…, <end:b>, …, <begin:dst>]: a document of several parts
        whose next part is modality `dst`."""
        toks, _ = self.document(parts)
        return [*toks[:-1].tolist(), self.begin(dst)]

    # ---- layout and persistence ----------------------------------------------------
    def layout(self) -> dict:
        mods = []
        for m in self.modalities:
            cls_version = registry.discover().get(m.name, (None, "?"))[1]
            mods.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "package_version": cls_version,
                    "begin": self.begin(m.name),
                    "end": self.end(m.name),
                    "offset": self.offset(m.name),
                    "size": m.vocab_size,
                    "fingerprint": m.fingerprint(),
                    "options": m.options.model_dump(mode="json"),
                }
            )
        body = {"format": 1, "specials": SPECIALS, "size": self.size, "modalities": mods}
        return {**body, "fingerprint": layout_fingerprint(body)}

    @property
    def fingerprint(self) -> str:
        return self.layout()["fingerprint"]

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for m in self.modalities:
            m.save(d / m.name)
        (d / "vocab.json").write_text(json.dumps(self.layout(), indent=1))
        return d / "vocab.json"

    @classmethod
    def load(cls, directory: str | Path, names: Sequence[str] | dict[str, dict] | None = None) -> Vocabulary:
        """Load a tokenizer bundle. `names` (the config's modalities, in order, optionally with their
        options) must match what the bundle was fitted with."""
        d = Path(directory)
        vj = d / "vocab.json"
        if not vj.exists():
            raise UserError(f"no tokenizer bundle at {d} (vocab.json missing): run `omnistream tokenizers fit CONFIG`")
        layout = json.loads(vj.read_text())
        problem = bundle_mismatch(layout, names) if names is not None else None
        if problem:
            raise UserError(
                f"tokenizer bundle {d} does not match the config: {problem}; "
                f"refit with `omnistream tokenizers fit CONFIG`"
            )
        mods = []
        for entry in layout["modalities"]:
            m = registry.build(entry["name"], entry["options"])
            m.load(d / entry["name"])
            if m.fingerprint() != entry["fingerprint"]:
                raise UserError(
                    f"tokenizer state of {entry['name']!r} in {d} does not match its fingerprint in vocab.json"
                )
            mods.append(m)
        vocab = cls(mods)
        if vocab.fingerprint != layout["fingerprint"]:
            # say what differs: a plugin whose vocab_size (or version) changed since the bundle was fitted
            diff = describe_mismatch(layout, vocab.layout())
            raise UserError(
                f"vocab.json in {d} does not match the tokenizers beside it as installed now ({diff}): "
                f"refit with `omnistream tokenizers fit CONFIG`; a plugin that changes its vocab_size "
                f"must bump its version"
            )
        return vocab


def bundle_mismatch(layout: dict, wanted: Sequence[str] | dict[str, dict]) -> str | None:
    """How a bundle's layout differs from the config's modalities (order, and options where given)."""
    stored = [m["name"] for m in layout["modalities"]]
    if list(wanted) != stored:
        return f"it has modalities {stored}, the config asks for {list(wanted)}"
    if isinstance(wanted, dict):
        for m in layout["modalities"]:
            want = registry.build(m["name"], wanted[m["name"]]).options.model_dump(mode="json")
            # the bundle's options through today's model: a field added since it was fitted has its default
            have = registry.build(m["name"], m["options"]).options.model_dump(mode="json")
            diff = [f"{m['name']}.{k}={have.get(k)!r} (config: {v!r})" for k, v in want.items() if have.get(k) != v]
            if diff:
                return "fitted with " + ", ".join(diff)
    return None


def layout_fingerprint(body: dict) -> str:
    keep = {
        "specials": body["specials"],
        "size": body["size"],
        "modalities": [
            {k: m[k] for k in ("name", "version", "offset", "size", "fingerprint")} for m in body["modalities"]
        ],
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def describe_mismatch(expected: dict, found: dict) -> str:
    """A one-line account of how two vocab layouts differ (for checkpoint refusals)."""
    e = {m["name"]: m for m in expected.get("modalities", [])}
    f = {m["name"]: m for m in found.get("modalities", [])}
    diffs = []
    for name in e.keys() - f.keys():
        diffs.append(f"modality {name!r} is missing now")
    for name in f.keys() - e.keys():
        diffs.append(f"modality {name!r} was not in the checkpoint's vocabulary")
    for name in e.keys() & f.keys():
        for k in ("offset", "size", "version", "fingerprint"):
            if e[name][k] != f[name][k]:
                diffs.append(f"{name}.{k} {e[name][k]} -> {f[name][k]}")
    if not diffs and expected.get("size") != found.get("size"):
        diffs.append(f"size {expected.get('size')} -> {found.get('size')}")
    return "; ".join(diffs) or "layouts differ"
