"""Readers for data as people keep it: Parquet (Hugging Face datasets exported to it too), JSONL manifests
and media folders (Hugging Face imagefolder / audiofolder, LibriSpeech). Registered in formats.READERS.

Each turns a row (a dict of column values) into the RawRecord the tar reader yields, by one rule
(`Mapping.record`):

  - `columns` maps a record field to a column: `{ text = "caption", image = "image" }`. A field is a
    modality's name (its first extension is used: text -> txt, image -> jpg) or an extension (`png`,
    `json`). Left empty, a column named like a modality or one of its extensions (`text`, `caption`,
    `image`, `jpg`, `audio`, `flac`, ...) is taken as that field;
  - `parts` maps fields to list columns for documents of several parts (OBELICS rows: `texts` and
    `images`, one of them non-null at each place): the non-null items, place by place, are the parts
    KEY.0.<ext>, KEY.1.<ext>, ... of one document;
  - a text field's string is its text; a media field's value is bytes, a Hugging Face `Image`/`Audio`
    struct ({bytes, path}), or a path resolved under `media_root` (default: the folder of the file that
    names it). A path that leaves that root (absolute, `..`, or a link pointing out) is refused: its
    record is errored as `path_outside_root`, counted, and nothing outside is opened;
  - `key` names the key column (default: `__key__`, `key` or `id` when there is one; else the row's
    place in the file, zero-padded);
  - every other column with a plain value goes into the record's `json` labels (`labels` lists them
    instead, when given).

Why pyarrow for Parquet rather than Ray Data's `read_parquet`: a shard here is read inside the same
RecordProcessor actors as a tar, one record at a time with its failures counted against the shard and
its key (Ray Data's reader fails the whole dataset on one bad file and knows no record keys). pyarrow
reads row groups in batches, so a shard's memory is bounded by one batch of rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .config import Limits
from .records import RawRecord, part_ext

TEXT_NAMES = ("caption", "sentence", "transcription", "transcript")  # columns that are text, beside `text`
KEY_COLUMNS = ("__key__", "key", "id")
BATCH_ROWS = 64  # Parquet rows decoded at once: a shard's memory is one batch of rows, not its row group


class TableOptions(BaseModel):
    """How a row becomes a record (data.format_options, or a source's format_options)."""

    model_config = ConfigDict(extra="forbid")

    columns: dict[str, str] = Field(
        default_factory=dict,
        description="record field <- column, e.g. { text = 'caption', image = 'image' }; a field is a "
        "modality name or an extension; empty: columns named like a modality or its extensions",
    )
    parts: dict[str, str] = Field(
        default_factory=dict,
        description="documents of several parts: field <- list column, e.g. { text = 'texts', image = "
        "'images' }; the non-null items, place by place, are the document's parts in order",
    )
    key: str = Field(
        "", description="the column holding the record key ('' = __key__, key or id, else the row's place)"
    )
    labels: list[str] | None = Field(
        None, description="columns stored as the record's json labels (None = every other plain column)"
    )
    media_root: str = Field(
        "", description="where media paths resolve ('' = the folder of the file naming them); never outside it"
    )


def _modalities() -> dict[str, tuple[str, ...]]:
    """Installed modality name -> its extensions (the plugin registry's table)."""
    from omnistream.modalities import registry

    return {n: tuple(cls.keys) for n, (cls, _) in registry.discover().items()}


class PathRefused(Exception):
    """A media path that leaves its root."""


class Mapping:
    """The row -> record rule, under one TableOptions and the installed modalities."""

    def __init__(self, options: TableOptions):
        self.o = options
        self.mods = _modalities()
        self.owner = {e: n for n, keys in self.mods.items() for e in keys}
        self.text_exts = set(self.mods.get("text", ("txt", "text"))) | {"json"}
        self.sizes: dict[str, int] = {}  # {path: size} of the folder being read, from its listing
        self._plans: dict[tuple, tuple] = {}

    def ext_of(self, field: str) -> str:
        """The extension a field is stored under: a modality's first one, or the field itself."""
        f = field.lower()
        return self.mods[f][0] if f in self.mods else f

    def guess(self, column: str) -> str | None:
        c = column.lower()
        if c in self.mods:
            return self.mods[c][0]
        if c in self.owner or c == "json":
            return c
        if c in TEXT_NAMES and "text" in self.mods:
            return self.mods["text"][0]
        i, e = part_ext(c)
        if i is not None and e in self.owner:  # `0.txt`, `1.jpg`: a document's parts, as tar members name them
            return c
        return None

    def plan(self, names: list[str]) -> tuple[str, dict[str, str], dict[str, str], list[str]]:
        """(key column, {ext: column}, {ext: list column}, label columns) for a table with these columns
        (worked out once per set of columns: manifests and metadata files repeat theirs on every row)."""
        k = tuple(names)
        if k not in self._plans:
            self._plans[k] = self._plan(list(names))
        return self._plans[k]

    def _plan(self, names: list[str]) -> tuple[str, dict[str, str], dict[str, str], list[str]]:
        key = self.o.key or next((k for k in KEY_COLUMNS if k in names), "")
        if self.o.columns or self.o.parts:
            cols = {self.ext_of(f): c for f, c in self.o.columns.items()}
        else:
            cols = {}
            for c in names:
                e = self.guess(c)
                if e and e not in cols and c != key:
                    cols[e] = c
        parts = {self.ext_of(f): c for f, c in self.o.parts.items()}
        used = {key, *cols.values(), *parts.values()}
        labels = list(self.o.labels) if self.o.labels is not None else [c for c in names if c not in used]
        return key, cols, parts, labels

    def record(self, shard: str, place: int, row: dict, layout, base: str, bounds) -> RawRecord:
        """One row as a record. `base`: the folder paths resolve under when media_root is not set."""
        key_col, cols, parts, labels = layout
        key = str(row[key_col]) if key_col and row.get(key_col) is not None else f"{place:08d}"
        rec = RawRecord(shard, key)
        root = self.o.media_root or base
        try:
            fields: list[tuple[str, object]] = [(e, row.get(c)) for e, c in cols.items()]
            if parts:
                lists = {e: row.get(c) or [] for e, c in parts.items()}
                n = 0
                for i in range(max((len(v) for v in lists.values()), default=0)):
                    for e, items in lists.items():
                        if i < len(items) and items[i] is not None:
                            fields.append((f"{n}.{e}", items[i]))
                            n += 1
            limits = bounds.limits or Limits()
            got: dict[str, bytes] = {}
            held = 0
            for f, value in fields:  # the record's bounds as it is read: no file is read past them
                if value is None:
                    continue
                if len(got) >= limits.members:
                    raise _Bad("too_many_members", f"{f}: more than {limits.members} fields")
                ext, data = self.value(f, value, root, bounds)
                held += len(data)
                if held > limits.record_bytes:
                    raise _Bad("record_too_large", f"{f}: {held} bytes > {limits.record_bytes}")
                got[ext] = data
            lab = {c: row[c] for c in labels if c in row and _plain(row[c])}
            if lab and "json" not in got:
                got["json"] = json.dumps(lab, sort_keys=True).encode()
        except PathRefused as e:
            rec.error, rec.detail = "path_outside_root", str(e)[:300]
            return rec
        except _Bad as e:
            rec.error, rec.detail = e.reason, e.detail[:300]
            return rec
        return _bounded(rec, got, bounds)

    def value(self, field: str, value, root: str, bounds) -> tuple[str, bytes]:
        """(the field's extension, its bytes) for one column value."""
        place, _, ext = field.rpartition(".")
        prefix = f"{place}." if place else ""
        if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a Hugging Face Image / Audio
            if value.get("bytes") is not None:
                return prefix + self._ext_from(ext, value.get("path")), bytes(value["bytes"])
            value = value.get("path")
            if value is None:
                raise _Bad("media_missing", f"{field}: neither bytes nor a path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return field, bytes(value)
        if ext in self.text_exts:
            if isinstance(value, str):
                return field, value.encode("utf-8", "surrogatepass")
            return field, json.dumps(value, sort_keys=True).encode()
        if not isinstance(value, str):
            raise _Bad("media_unreadable", f"{field}: a {type(value).__name__}, not bytes or a path")
        return prefix + self._ext_from(ext, value), read_media(root, value, bounds, field, self.sizes)

    def _ext_from(self, ext: str, path: str | None) -> str:
        """A media path's own extension when its modality is the field's (a .png in the image column is
        stored as png), else the field's."""
        if path:
            own = posixpath.splitext(str(path))[1][1:].lower()
            if own and self.owner.get(own) is not None and self.owner.get(own) == self.owner.get(ext):
                return own
        return ext


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _plain(v) -> bool:
    return (
        v is None
        or isinstance(v, (str, int, float, bool))
        or (isinstance(v, (list, dict)) and len(json.dumps(v, default=str)) < 4096)
    )


def inside(root: str, rel: str) -> str:
    """`rel` under `root`, or PathRefused: an absolute path, a `..` that climbs out, or (on local disk) a
    link whose target is outside. Nothing is opened before this says yes."""
    if not rel or rel.startswith(("/", "\\")) or "\\" in rel or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise PathRefused(f"{rel!r} is not a relative path under {root}")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise PathRefused(f"{rel!r} leaves {root}")
    full = posixpath.join(root.rstrip("/"), norm)
    if "://" not in root:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(full)]) != real_root:
            raise PathRefused(f"{rel!r} points outside {root} (through a link)")
    return full


def read_media(root: str, rel: str, bounds, field: str, sizes: dict | None = None) -> bytes:
    """The bytes of a media file under `root`, within the bounds (its size checked before it is read: from
    `sizes`, a listing's {path: size}, where it was listed, so a remote folder costs no HEAD per file)."""
    import fsspec

    full = inside(root, rel)
    _, ext = posixpath.splitext(rel)
    cap = _cap(bounds, ext[1:].lower())
    try:
        if "://" in full:
            fs, path = fsspec.core.url_to_fs(full)
            size = (sizes or {}).get(path)
            size, opener = size if size is not None else fs.size(path), lambda: fs.open(path, "rb")
        else:  # local: the OS directly (an fsspec filesystem resolved per file cost a third of a folder's read)
            size, opener = os.path.getsize(full), lambda: open(full, "rb")
        if size is not None and size > cap:
            raise _Bad("member_too_large", f"{field} ({rel}): {size} bytes > {cap}")
        with opener() as f:
            data = f.read(cap + 1)
    except FileNotFoundError:
        raise _Bad("media_missing", f"{field}: {rel} is not there") from None
    except (OSError, ValueError) as e:
        raise _Bad("media_unreadable", f"{field} ({rel}): {type(e).__name__}: {e}") from None
    if len(data) > cap:
        raise _Bad("member_too_large", f"{field} ({rel}): more than {cap} bytes")
    return data


def _cap(bounds, ext: str) -> int:
    return min(bounds.max_member_bytes, bounds.ext_bytes.get(part_ext(ext)[1], bounds.max_member_bytes))


def _bounded(rec: RawRecord, got: dict[str, bytes], bounds) -> RawRecord:
    """The tar reader's per-record bounds, applied to a row's fields."""
    limits = bounds.limits or Limits()
    held = 0
    for ext, data in got.items():
        cap = _cap(bounds, ext)
        held += len(data)
        if len(data) > cap:
            rec.error, rec.detail = "member_too_large", f"{ext}: {len(data)} bytes > {cap}"
        elif held > limits.record_bytes:
            rec.error, rec.detail = "record_too_large", f"{ext}: {held} bytes > {limits.record_bytes}"
        if rec.error:
            return rec
    if len(got) > limits.members:
        rec.error, rec.detail = "too_many_members", f"{len(got)} fields > {limits.members}"
        return rec
    rec.fields = got
    return rec


def _small_file(fs, path: str, bounds) -> bytes:
    """A metadata or transcript file, read whole when it is within data.limits.record_bytes (a larger one is
    not metadata: OSError, its shard's record says so)."""
    cap = (bounds.limits or Limits()).record_bytes
    size = fs.size(path)
    if size is not None and size > cap:
        raise OSError(f"{size} bytes > data.limits.record_bytes = {cap}")
    return fs.cat_file(path)


def _shard_failed(shard: str, e: Exception) -> RawRecord:
    missing = isinstance(e, FileNotFoundError) or isinstance(e.__cause__, FileNotFoundError)
    return RawRecord(
        shard, "", error="shard_missing" if missing else "shard_unreadable", detail=f"{type(e).__name__}: {e}"[:300]
    )


def _rows_to_records(shard: str, rows: Iterator[tuple[int, dict]], mapping: Mapping, names, base, bounds):
    """Records of (place, row) pairs, keys checked unique within the shard as the tar reader does."""
    layout = mapping.plan(names)
    seen: set[str] = set()
    for place, row in rows:
        rec = mapping.record(shard, place, row, layout, base, bounds)
        if rec.key in seen:
            rec = RawRecord(shard, rec.key, error="duplicate_key", detail=f"row {place}")
        seen.add(rec.key)
        yield rec


def _folder_of(shard: str) -> str:
    return shard.rsplit("/", 1)[0] if "/" in shard else "."


class Parquet:
    """Parquet files, one shard each (local or s3://): a row is a record (TableOptions). A `.arrow` file (the
    Arrow IPC stream a Hugging Face dataset's save_to_disk writes) is read the same way."""

    requires: ClassVar[dict[str, str]] = {}  # pyarrow is a dependency (the token cache is Parquet too)
    Options: ClassVar[type[BaseModel]] = TableOptions

    def __init__(self, options: TableOptions | None = None):
        self.mapping = Mapping(options or TableOptions())

    def read(self, shard: str, bounds) -> Iterator[RawRecord]:
        import fsspec
        import pyarrow.ipc as ipc
        import pyarrow.parquet as pq

        try:
            f = fsspec.open(shard, "rb").open()
            if shard.lower().endswith(".arrow"):  # Hugging Face save_to_disk: Arrow IPC streams
                src = ipc.open_stream(f)
                batches, names = (b for b in src), src.schema.names
            else:
                pf = pq.ParquetFile(f)
                batches, names = pf.iter_batches(batch_size=BATCH_ROWS), pf.schema_arrow.names
        except Exception as e:  # noqa: BLE001 - a file that will not open is the shard's failure, accounted
            yield _shard_failed(shard, e)
            return
        place = 0

        def rows():
            nonlocal place
            for batch in batches:
                for a in range(0, batch.num_rows, BATCH_ROWS):  # an IPC batch may be large: a slice at a time
                    for row in batch.slice(a, BATCH_ROWS).to_pylist():
                        yield place, row
                        place += 1

        try:
            with f:
                yield from _rows_to_records(shard, rows(), self.mapping, names, _folder_of(shard), bounds)
        except Exception as e:  # noqa: BLE001 - damaged pages end the shard, with what was read kept
            yield RawRecord(shard, "", error="shard_damaged", detail=f"row {place}: {type(e).__name__}: {e}"[:300])

    def write_sample(self, path: Path, records: list[tuple[str, dict[str, bytes]]]) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        exts = sorted({e for _, f in records for e in f})
        cols = {"__key__": [k for k, _ in records], **{e: [f.get(e) for _, f in records] for e in exts}}
        out = str(Path(path) / "sample-000.parquet")
        pq.write_table(
            pa.table({c: pa.array(v, pa.string() if c == "__key__" else pa.binary()) for c, v in cols.items()}), out
        )
        return out


class JsonLines:
    """A JSONL manifest, one shard each: one object a line, media by path under its folder (TableOptions)."""

    requires: ClassVar[dict[str, str]] = {}
    Options: ClassVar[type[BaseModel]] = TableOptions

    def __init__(self, options: TableOptions | None = None):
        self.mapping = Mapping(options or TableOptions())

    def read(self, shard: str, bounds) -> Iterator[RawRecord]:
        import fsspec

        limit = (bounds.limits or Limits()).record_bytes
        try:
            f = fsspec.open(shard, "rb").open()
        except Exception as e:  # noqa: BLE001
            yield _shard_failed(shard, e)
            return
        with f:
            yield from self._lines(shard, f, limit, bounds)

    def _lines(self, shard, f, limit, bounds):
        seen: set[str] = set()
        place = 0
        while True:
            try:
                line = f.readline(limit + 1)
            except Exception as e:  # noqa: BLE001
                yield RawRecord(shard, "", error="shard_unreadable", detail=f"line {place + 1}: {e}"[:300])
                return
            if not line:
                return
            place += 1
            if len(line) > limit:
                while line and not line.endswith(b"\n"):  # skip the rest of the line, unread
                    line = f.readline(1 << 20)
                yield RawRecord(
                    shard, f"line-{place:08d}", error="record_too_large", detail=f"line {place}: > {limit} bytes"
                )
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a {type(row).__name__}, not an object")
            except ValueError as e:
                yield RawRecord(
                    shard, f"line-{place:08d}", error="bad_manifest_line", detail=f"line {place}: {e}"[:300]
                )
                continue
            layout = self.mapping.plan(list(row))
            rec = self.mapping.record(shard, place - 1, row, layout, _folder_of(shard), bounds)
            if rec.key in seen:
                rec = RawRecord(shard, rec.key, error="duplicate_key", detail=f"line {place}")
            seen.add(rec.key)
            yield rec

    def write_sample(self, path: Path, records: list[tuple[str, dict[str, bytes]]]) -> str:
        out = Path(path) / "manifest.jsonl"
        with out.open("w") as f:
            for key, fields in records:
                row = {"key": key}
                for ext, data in fields.items():
                    if ext in self.mapping.text_exts:
                        row[ext] = data.decode()
                    else:
                        media = Path(path) / "media" / f"{key}.{ext}"
                        media.parent.mkdir(parents=True, exist_ok=True)
                        media.write_bytes(data)
                        row[ext] = str(media.relative_to(path))
                f.write(json.dumps(row) + "\n")
        return str(out)


class Folder:
    """A folder of media, one shard each:

    - Hugging Face imagefolder / audiofolder: `metadata.jsonl` or `metadata.csv` (in the folder or below
      it), one row a record, its `file_name` relative to the metadata's folder, other columns by the
      TableOptions rule (`text` is the caption);
    - LibriSpeech: `*.trans.txt` files, each line `UTTERANCE-ID text`, the audio `UTTERANCE-ID.flac`
      beside it;
    - neither: every file a modality reads, the files sharing a name (`a/001.jpg`, `a/001.txt`,
      `a/001.json`) one record keyed by it (a WebDataset shard unpacked, document parts `a/001.2.jpg`
      included), labelled with its folder's name when it sits in one and has no .json (imagefolder's
      class labels).
    Records come in the order of the sorted paths and of the lines within a file."""

    requires: ClassVar[dict[str, str]] = {}
    Options: ClassVar[type[BaseModel]] = TableOptions

    def __init__(self, options: TableOptions | None = None):
        self.mapping = Mapping(options or TableOptions())

    def read(self, shard: str, bounds) -> Iterator[RawRecord]:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(shard)
            if not fs.isdir(root):
                raise FileNotFoundError(shard)
            listed = fs.find(root, detail=True)
            files = sorted(listed)
            # a remote folder's sizes from its listing (read_media asks no HEAD of a listed file)
            self.mapping.sizes = {p: e.get("size") for p, e in listed.items()} if "://" in shard else {}
        except Exception as e:  # noqa: BLE001
            yield _shard_failed(shard, e)
            return
        proto = shard.split("://", 1)[0] + "://" if "://" in shard else ""
        rel = [f[len(root.rstrip("/")) + 1 :] for f in files]
        meta = [r for r in rel if posixpath.basename(r) in ("metadata.jsonl", "metadata.csv")]
        trans = [r for r in rel if r.endswith(".trans.txt")]
        base = shard.rstrip("/")
        seen: set[str] = set()
        if meta:
            records = self._metadata(shard, fs, root, proto, meta, bounds)
        elif trans:
            records = self._librispeech(shard, fs, root, set(rel), trans, bounds)
        else:
            records = self._files(shard, base, rel, bounds)
        for rec in records:
            if rec.key and rec.key in seen:
                rec = RawRecord(shard, rec.key, error="duplicate_key", detail=rec.key)
            seen.add(rec.key)
            yield rec

    def _metadata(self, shard, fs, root, proto, meta, bounds):
        for m in meta:
            folder = posixpath.dirname(m)
            base = proto + posixpath.join(root, folder) if folder else proto + root
            try:
                text = _small_file(fs, posixpath.join(root, m), bounds).decode("utf-8")
                rows = (
                    [json.loads(x) for x in text.splitlines() if x.strip()]
                    if m.endswith(".jsonl")
                    else list(csv.DictReader(io.StringIO(text)))
                )
            except (OSError, ValueError) as e:
                yield RawRecord(shard, m, error="bad_manifest", detail=f"{m}: {type(e).__name__}: {e}"[:300])
                continue
            for place, row in enumerate(rows):
                if not isinstance(row, dict):
                    yield RawRecord(shard, f"{m}:{place}", error="bad_manifest_line", detail=f"{m} row {place}")
                    continue
                row = dict(row)
                name = row.get("file_name")
                if name and not self.mapping.o.key and not any(k in row for k in KEY_COLUMNS):
                    row["__key__"] = posixpath.join(folder, posixpath.splitext(str(name))[0])
                key, cols, parts, labels = self.mapping.plan([c for c in row if c != "file_name"])
                if name:  # the file is its own extension's field, whatever the column map says
                    own = posixpath.splitext(str(name))[1][1:].lower()
                    cols = {**cols, own: "file_name"}
                yield self.mapping.record(shard, place, row, (key, cols, parts, labels), base, bounds)

    def _librispeech(self, shard, fs, root, present, trans, bounds):
        for t in trans:
            folder = posixpath.dirname(t)
            try:
                lines = _small_file(fs, posixpath.join(root, t), bounds).decode("utf-8").splitlines()
            except (OSError, ValueError) as e:
                yield RawRecord(shard, t, error="bad_manifest", detail=f"{t}: {type(e).__name__}: {e}"[:300])
                continue
            for line in lines:
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                audio = next(
                    (f"{utt}.{e}" for e in ("flac", "wav") if posixpath.join(folder, f"{utt}.{e}") in present), None
                )
                key = posixpath.join(folder, utt)
                if audio is None:
                    yield RawRecord(shard, key, error="media_missing", detail=f"{t}: no audio for {utt}")
                    continue
                row = {"__key__": key, "text": text, "audio": audio}
                base = shard.rstrip("/") + ("/" + folder if folder else "")
                yield self.mapping.record(shard, 0, row, self.mapping.plan(list(row)), base, bounds)

    def _files(self, shard, base, rel, bounds):
        groups: dict[str, dict[str, str]] = {}
        for r in rel:
            stem, _, ext = posixpath.basename(r).partition(".")
            ext = ext.lower()
            if part_ext(ext)[1] in self.mapping.owner or ext == "json":  # `a.2.jpg`: a document's part 2
                groups.setdefault(posixpath.join(posixpath.dirname(r), stem), {})[ext] = r
        for key in sorted(groups):
            fields: dict[str, bytes] = {}
            rec = RawRecord(shard, key)
            try:
                for ext, r in sorted(groups[key].items()):
                    fields[ext] = read_media(base, r, bounds, ext, self.mapping.sizes)
            except _Bad as e:
                rec.error, rec.detail = e.reason, e.detail[:300]
                yield rec
                continue
            except PathRefused as e:
                rec.error, rec.detail = "path_outside_root", str(e)[:300]
                yield rec
                continue
            label = posixpath.dirname(key)
            if label and "json" not in fields:
                fields["json"] = json.dumps({"label": posixpath.basename(label)}).encode()
            yield _bounded(rec, fields, bounds)

    def write_sample(self, path: Path, records: list[tuple[str, dict[str, bytes]]]) -> str:
        """An imagefolder with metadata.jsonl: a record's media as `<key>.<ext>`, its text and labels in its row."""
        root = Path(path) / "folder"
        root.mkdir(parents=True, exist_ok=True)
        with (root / "metadata.jsonl").open("w") as f:
            for key, fields in records:
                row: dict = {"key": key}
                for ext, data in fields.items():
                    if ext == "json":
                        row.update(json.loads(data))
                    elif ext in self.mapping.text_exts:
                        row["text"] = data.decode()
                    else:
                        (root / f"{key}.{ext}").parent.mkdir(parents=True, exist_ok=True)
                        (root / f"{key}.{ext}").write_bytes(data)
                        row["file_name"] = f"{key}.{ext}"
                f.write(json.dumps(row) + "\n")
        return str(root)
