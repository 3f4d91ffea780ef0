"""Data formats: the table of readers a source's `format` picks, and `check_reader`, the kit that holds a
reader to the record the tar reader yields.

A reader turns one shard (a path or URL the source lists) into `RawRecord`s: a key, and the record's
members by lower-cased extension (`txt`, `jpg`, `wav`, `json`, ...) as bytes. Everything after it (the
modalities' decoding, quality filters, dedup, accounting, the token cache, exact resume) is the same for
every format. A reader never raises for what it reads: a record it cannot read whole is one `RawRecord`
with `error` (a reason) and `detail`, and a shard that fails as a whole is one with an empty key. It
keeps the bounds it is handed (`ReadBounds`): member and record sizes, members per record, bytes
decompressed from a shard, and a remote read's retries and deadline.

    class MyFormat:
        requires = {"pyarrow": "parquet"}    # module -> the extra that installs it, said in one line if missing
        Options = MyOptions                  # optional: a pydantic model of its format_options
        def __init__(self, options): ...     # (only with Options) the validated options
        def read(self, shard, bounds): ...  # -> Iterator[RawRecord]
        def write_sample(self, path, records): ...  # records [(key, {ext: bytes})] in this format -> shard

    READERS["myformat"] = MyFormat           # then: [data.sources.x] format = "myformat"

`write_sample` is what the kit needs to test a reader without fixtures: it writes records in the format,
reads them back, and checks they are the records written (tests/unit/test_formats.py runs it for every
registered format).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from omnistream.common.errors import ConformanceError, UserError

from .records import RawRecord, read_shard
from .tables import Folder, JsonLines, Parquet


@dataclass
class ReadBounds:
    """What one shard's read may cost, from the data section (DataConfig) and the modalities' member caps."""

    max_member_bytes: int = 64 << 20
    limits: Any = None  # config.Limits (None: its defaults)
    ext_bytes: dict[str, int] = field(default_factory=dict)  # per extension, tighter than max_member_bytes
    retries: int = 3
    deadline_s: float = float("inf")

    @classmethod
    def of(cls, cfg, ext_bytes: dict[str, int] | None = None) -> ReadBounds:
        return cls(cfg.max_member_bytes, cfg.limits, dict(ext_bytes or {}), cfg.remote_retries, cfg.read_deadline_s)


class Reader(Protocol):
    requires: ClassVar[dict[str, str]]

    def read(self, shard: str, bounds: ReadBounds) -> Iterator[RawRecord]: ...
    def write_sample(self, path: Path, records: list[tuple[str, dict[str, bytes]]]) -> str: ...


class WebDataset:
    """Tar shards (.tar, .tar.gz, .tar.bz2, .tar.xz, .tar.zst): a record is the run of members sharing a
    key (records.read_shard)."""

    requires: ClassVar[dict[str, str]] = {}

    def read(self, shard: str, bounds: ReadBounds) -> Iterator[RawRecord]:
        return read_shard(
            shard, bounds.max_member_bytes, bounds.limits, bounds.ext_bytes, bounds.retries, bounds.deadline_s
        )

    def write_sample(self, path: Path, records: list[tuple[str, dict[str, bytes]]]) -> str:
        import webdataset as wds

        out = str(Path(path) / "sample-000.tar")
        with wds.TarWriter(out) as w:
            for key, fields in records:
                w.write({"__key__": key, **fields})
        return out


READERS: dict[str, type] = {"webdataset": WebDataset, "parquet": Parquet, "jsonl": JsonLines, "folder": Folder}


def reader(name: str, options: dict | None = None) -> Reader:
    """The reader of format `name` under `options` (data.format_options, a source's over them); an unknown
    format, one whose library is not installed, or an option it does not take is a UserError in one line
    (naming the extra that installs it, or the option)."""
    if name not in READERS:
        raise UserError(f"data format {name!r} is not one omnistream reads (formats: {', '.join(sorted(READERS))})")
    cls = READERS[name]
    for module, extra in cls.requires.items():
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"data format {name!r} needs {module}, which is not installed: pip install 'omnistream[{extra}]'"
            )
    model = getattr(cls, "Options", None)
    if model is None:
        if options:
            raise UserError(f"data format {name!r} takes no format_options (given: {', '.join(sorted(options))})")
        return cls()
    from pydantic import ValidationError

    try:
        return cls(model(**(options or {})))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"format_options{'.' + where if where else ''} (format {name!r}): {err['msg']}") from None


# ---- the kit ------------------------------------------------------------------------------------------------

SAMPLE = [
    ("rec-000", {"txt": b"a caption", "json": b'{"label": 3}'}),
    ("rec-001", {"txt": "caf\u00e9 \u00fcber".encode(), "png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4}),
    ("dir/rec-002", {"wav": b"RIFF" + b"\x00" * 5000}),
    ("rec-003", {"txt": b"too big", "jpg": b"\xff\xd8" + b"\x01" * 70_000}),  # over the kit's member bound
]


def check_reader(name: str, tmp: Path) -> None:
    """Hold the reader of format `name` to the tar reader's contract; raises ConformanceError naming the check.

    - records written in the format (write_sample) come back in order with their keys and bytes;
    - a member over the bounds errors its record as member_too_large, and the records around it stay;
    - a shard that does not exist is one record with an empty key and reason shard_missing, not an exception;
    - what it yields is RawRecords with lower-cased extensions and bytes values."""
    from .config import Limits

    fmt = reader(name)

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConformanceError(f"data format {name!r}: {what}")

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    shard = fmt.write_sample(tmp, SAMPLE)
    bounds = ReadBounds(max_member_bytes=64 << 10, limits=Limits())
    got = list(fmt.read(shard, bounds))
    need(all(isinstance(r, RawRecord) for r in got), "yields something other than RawRecord")
    need(
        [r.key for r in got] == [k for k, _ in SAMPLE],
        f"keys {[r.key for r in got]} are not the records written, in order ({[k for k, _ in SAMPLE]})",
    )
    for r, (key, fields) in zip(got, SAMPLE):
        need(
            all(e == e.lower() and isinstance(v, bytes) for e, v in r.fields.items()),
            f"record {key}: extensions must be lower-case and values bytes",
        )
        if key == "rec-003":
            need(
                r.error == "member_too_large" and not r.fields,
                f"a member over data.max_member_bytes must error its record as member_too_large (got {r.error!r})",
            )
        else:
            need(
                r.error is None and r.fields == fields,
                f"record {key} does not come back as written ({sorted(r.fields)} against {sorted(fields)}; {r.error})",
            )
    missing = list(fmt.read(str(tmp / "no-such-shard"), bounds))
    need(
        len(missing) == 1 and missing[0].key == "" and missing[0].error == "shard_missing",
        f"a missing shard must be one record with an empty key and reason shard_missing (got "
        f"{[(r.key, r.error) for r in missing]})",
    )
